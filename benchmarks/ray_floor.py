"""What a Ray Data job costs before any image: the floor under the ray engine's small runs.

    python benchmarks/ray_floor.py --data /tmp/cifar10/train [--photos 2000] [--rounds 5]

On a running cluster (`ray start --head`, as bulk.py runs its jobs), each round measures, in
fresh processes: the in-process limit L on the photo set (bulk.py's child), `imagerec classify
--engine ray` on it, and a job of the same Ray Data shape that does nothing: the same paths as
rows in as many blocks, a decode stage and an actor pool of the same sizes and CPU shares whose
functions return their batch unchanged, iterated back, then Ray disconnected, timed as the
engine times itself (Ray and Ray Data already imported). To reach a share s of L on N images a
job may spend at most N / L * (1 / s - 1) seconds beyond N / L, and that only if it runs at L
once started; at s = 75% that is N / (3 L). The floor says how much of that allowance Ray Data
takes before imagerec does anything. Writes benchmarks/results/ray_floor.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
BULK = ROOT / "benchmarks" / "bulk.py"
TARGET = 0.75  # the ray engine's target share of the limit (issue 21)


def child_floor(count: int) -> dict:
    """The ray engine's Ray Data plan on `count` rows with stages that do nothing, timed."""
    import ray
    import ray.data

    from imagerec.bulk_ray import actor_pool, node_cpus, plan_shape

    def keep(batch: dict) -> dict:  # the decode stage's place
        return batch

    class Keep:  # the classifier's place: an actor that loads nothing
        def __call__(self, batch: dict) -> dict:
            return batch

    paths = [f"/nowhere/{i:06d}.jpg" for i in range(count)]
    start = time.monotonic()
    ray.init(logging_level="WARNING")
    threads, pool, share, step = plan_shape(node_cpus(ray), count)  # as classify_on_ray plans
    dataset = ray.data.from_items(
        [{"path": path} for path in paths], override_num_blocks=-(-count // step)
    )
    kept = dataset.map_batches(keep, batch_size=step, batch_format="numpy", num_cpus=share)
    kept = kept.map_batches(
        Keep,
        batch_size=step,
        batch_format="numpy",
        compute=actor_pool(ray, pool, threads),
        num_cpus=share,
    )
    rows = sum(len(b["path"]) for b in kept.iter_batches(batch_size=None, batch_format="numpy"))
    ray.shutdown()
    seconds = time.monotonic() - start
    assert rows == count
    return {"rows": rows, "seconds": seconds}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_floor(int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of CIFAR-10 JPEGs")
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10"))
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imagerec-bulk")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_floor.md"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(BULK.parent))
    from bulk import RayCluster, make_photos, measure, wait_for_quiet

    def run_child(args: list[str], script: Path, cluster: RayCluster | None = None) -> dict:
        # No sampler: it would slow the Ray jobs, and peak memory is bulk.md's to report.
        return measure(args, cluster=cluster, script=str(script), sample=False)

    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    args.work.mkdir(parents=True, exist_ok=True)
    folder = make_photos(args.data, args.work / f"photos-{args.photos}", args.photos)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    paths_file = args.work / f"photos-{args.photos}-paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    n = len(paths)
    rows = []
    with RayCluster() as cluster:
        run_child(["floor", str(n)], Path(__file__), cluster)  # Ray Data's own actors
        for r in range(args.rounds):
            wait_for_quiet()
            limit = run_child(["limit", str(paths_file), args.model, "64"], BULK)
            wait_for_quiet()
            floor = run_child(["floor", str(n)], Path(__file__), cluster)
            wait_for_quiet()
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                job = run_child(
                    ["classify", str(folder), args.model, f"{tmp}/r.parquet", "ray", "64"],
                    BULK,
                    cluster,
                )
            rate = limit["rate_with_decoding"]
            rows.append(
                {
                    "limit": rate,
                    "allowance": n / rate * (1 / TARGET - 1),
                    "floor": floor["seconds"],
                    "job": job["seconds"],
                    "beyond": job["seconds"] - n / rate,
                    "share": n / job["seconds"] / rate,
                }
            )
            print(f"round {r + 1}: {rows[-1]}", file=sys.stderr, flush=True)
    med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    lines = [
        "# Ray Data's floor a job, against the ray engine's allowance",
        "",
        f"Command: `python benchmarks/ray_floor.py {' '.join(sys.argv[1:])}`",
        f"Run at {started} UTC; every figure below is from this run.",
        "",
        f"- CPU: {cpu_description()}",
        f"- {n:,} photo-sized JPEGs (1024x768, bulk.py's photo set); a cluster started with "
        "`ray start --head` on this machine; every measurement in a fresh process.",
        "- limit: the in-process limit, images/s (bulk.py's, decoding included).",
        f"- allowance: the most a job may spend beyond N / limit and still reach "
        f"{TARGET:.0%} of the limit, N / limit x (1 / {TARGET} - 1), in seconds.",
        "- floor: a Ray Data job of the ray engine's shape whose stages do nothing, on N rows, "
        "from `ray.init` to `ray.shutdown`, in seconds.",
        "- ray job: `imagerec classify --engine ray` on the N photos, as bulk.py times it; "
        "beyond: its seconds less N / limit.",
        "",
        "| round | limit | allowance (s) | floor (s) | ray job (s) | beyond (s) | of limit |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, row in enumerate([*rows, med], 1):
        name = str(i) if i <= len(rows) else "**median**"
        lines.append(
            f"| {name} | {row['limit']:.0f} | {row['allowance']:.2f} | {row['floor']:.2f} | "
            f"{row['job']:.2f} | {row['beyond']:.2f} | {row['share']:.0%} |"
        )
    above = sum(row["floor"] > row["allowance"] for row in rows)
    lines += [
        "",
        f"In {above} of {len(rows)} rounds Ray Data's floor alone was larger than the allowance.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

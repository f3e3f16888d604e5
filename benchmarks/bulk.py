"""Bulk classification benchmark: `imagerec classify` on the local engine and on Ray Data,
against the in-process limit of the same predictor, for CIFAR-sized and photo-sized JPEGs.

    python benchmarks/bulk.py --data /tmp/cifar10/train [--photos 2000,5000] [--rounds 3]

`--data` is a folder of CIFAR-10 JPEGs (the 50,000 shared training images, extracted outside
the repository). The photo-sized sets (`--photos`: a set of that many JPEGs of 1024x768 for
each count, made from CIFAR images scaled up with grain added, so that they compress and decode
like photographs) are written under `--work` once and reused. A Ray job costs seconds whatever
its size, so more than one count shows how that cost fades as the set grows. Every measurement
runs in a fresh process, the kinds in turn within a round (limit, local, ray), so that a change
in the machine's load falls on all of them; the table gives medians over the rounds and each
round's ratios. The limit is the same predictor on the same files in one process, decoding
included, and nothing else; the model alone on pre-decoded arrays is given beside it. Peak
memory is the proportional set size (PSS) of the measured process and all its descendants
(Ray's GCS, raylet and workers included), sampled every second. Writes benchmarks/results/bulk.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64  # imagerec classify's default


# Children: each measurement in its own process ------------------------------------------------


def child_limit(paths_file: str, model: str, batch: int) -> dict:
    """The predictor alone on pre-decoded arrays held in memory, batched: the upper limit.

    Both ways of running it on this machine's cores are measured, the better one is the limit:
    one ONNX Runtime session on every core, or one session a thread on its share of them,
    called from that many threads (the local engine's way). The single-core decode cost of an
    image is measured too, for the decode-inclusive limit: first on up to 200 images with the C
    library's malloc as it comes, then with the decode buffers held as both engines hold them
    (images.hold_decode_buffers), which the rest of this process keeps."""
    from imagerec.images import hold_decode_buffers, load_image
    from imagerec.predictor import Predictor

    paths = Path(paths_file).read_text().splitlines()
    loaded = Predictor.from_path(model, max_batch=batch, engine="auto")
    size = loaded.input_size

    def decode_cpu_s(sample: list[str]) -> float:  # CPU seconds an image, one thread
        start = time.process_time()
        for path in sample:
            load_image(path, size)
        return (time.process_time() - start) / len(sample)

    sample = paths[:200]
    decode_cpu_s(sample[:20])  # the decoder's first calls
    decode_default_s = decode_cpu_s(sample)
    held = hold_decode_buffers()
    start = time.process_time()
    pixels = np.stack([load_image(p, size) for p in paths])
    decode_s = (time.process_time() - start) / len(paths)  # CPU seconds an image, one thread
    batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
    rates, windows = {}, {}
    for workers in (1, 2):
        predictor = Predictor.from_path(model, max_batch=batch, engine="auto", workers=workers)
        predictor.predict_arrays(batches[0])
        start, started = time.perf_counter(), time.time()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(predictor.predict_arrays, batches))
        rates[workers] = len(pixels) / (time.perf_counter() - start)
        windows[workers] = [started, time.time()]
    best = max(rates, key=rates.get)
    # The same predictor on the files themselves: each thread reads and decodes a batch on one
    # core, then classifies it in its own session, nothing else done (no listing, no ranking, no
    # writing). This is the most a bulk run can do, the limit its targets are judged by.
    import cv2

    cv2.setNumThreads(1)
    predictor = Predictor.from_path(model, max_batch=batch, engine="auto", workers=2)
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]

    def decode_and_classify(chunk: list[str]) -> np.ndarray:
        return predictor.predict_arrays(np.stack([load_image(p, size) for p in chunk]))

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(decode_and_classify, chunks))
    with_decoding = len(paths) / (time.perf_counter() - start)
    return {
        "images": len(paths),
        "rate": rates[best],
        "window": windows[best],
        "rate_one_session": rates[1],
        "rate_two_sessions": rates[2],
        "rate_with_decoding": with_decoding,
        "decode_cpu_s": decode_s,
        "decode_default_cpu_s": decode_default_s,
        "buffers_held": held,
        "engine": loaded.engine,
    }


def child_classify(folder: str, model: str, out: str, engine: str, batch: int) -> dict:
    """`imagerec classify` through its library call, as the command runs it. For the ray
    engine, the parent's RAY_ADDRESS names a running cluster, or, unset, the call starts (and
    stops) its own, as the command does."""
    from imagerec.bulk import classify

    started = time.time()
    result = classify(model, [folder], out, engine=engine, batch_size=batch, progress=False)
    return {
        "images": result.written,
        "errors": result.errors,
        "rate": result.images_per_s,
        "seconds": result.seconds,
        "window": [started, time.time()],
    }


# The parent: data, rounds, the table ----------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> dict[int, float]:
    """{pid: CPU seconds so far} for `root` and every descendant (Linux /proc)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
                cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def tree_pss_kb(pids) -> int:
    """PSS of the processes `pids`, in kB (0 for those that cannot be read)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS  # less idle and iowait


def wait_for_quiet(limit_cores: float = 0.3, longest_s: float = 20) -> float:
    """Wait (up to `longest_s`) until other work uses under `limit_cores` over 3 s; the last
    level seen, in cores."""
    deadline = time.monotonic() + longest_s
    while True:
        before = machine_busy_s()
        time.sleep(3)
        busy = (machine_busy_s() - before) / 3
        if busy < limit_cores or time.monotonic() > deadline:
            return busy


def measure(
    args: list[str],
    timeout: float = 1800,
    cluster: RayCluster | None = None,
    script: str = __file__,
    sample: bool = True,
) -> dict:
    """Run `script` (this one) as a child with `args`; its JSON answer, plus the tree's peak PSS
    unless `sample` is off (the sampler costs a Ray job up to a second or two). With a
    `cluster`, the child joins it (RAY_ADDRESS), and its processes count as the child's."""
    command = [sys.executable, str(script), "--child", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("RAY_ADDRESS", None)
    if cluster is not None:
        env["RAY_ADDRESS"] = cluster.address
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak, done = 0, threading.Event()
    samples: list[tuple[float, float, float]] = []  # (time, tree CPU s, machine busy s)
    seen: dict[int, float] = {}

    def sample_tree():
        # Every 0.5 s, PSS every 1 s: reading smaps_rollup walks a process's page tables, and
        # at 0.2 s over Ray's dozen processes this sampler took 0.3 of the 2 cores.
        nonlocal peak
        tick = 0
        while not done.wait(0.5):
            tree = process_tree(process.pid)
            for root in cluster.roots if cluster is not None else ():
                tree.update(process_tree(root))
            seen.update(tree)  # a process's last reading stands once it has exited
            samples.append((time.time(), sum(seen.values()), machine_busy_s()))
            tick += 1
            if tick % 2:
                peak = max(peak, tree_pss_kb(tree))

    sampler = threading.Thread(target=sample_tree, daemon=True)
    if sample:
        sampler.start()
    out, err = process.communicate(timeout=timeout)
    done.set()
    if sample:
        sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{err.decode()[-3000:]}")
    answer = json.loads(out.decode().strip().splitlines()[-1])
    answer["peak_mb"] = peak / 1024
    if "window" in answer and samples:
        start, stop = answer["window"]
        first = min(samples, key=lambda s: abs(s[0] - start))
        last = min(samples, key=lambda s: abs(s[0] - stop))
        ours = last[1] - first[1]
        answer["cpu_ms"] = ours / answer["images"] * 1e3 if answer["images"] else 0.0
        # What other users' processes took meanwhile, in cores: the machine's busy time less ours.
        answer["others_cores"] = max(0.0, (last[2] - first[2] - ours) / max(last[0] - first[0], 1))
    return answer


class RayCluster:
    """A Ray cluster on this machine, started as a user starts one (`ray start --head`) and
    joined by each ray run through RAY_ADDRESS, as `ray job submit` runs jobs on it."""

    ray = str(Path(sys.executable).with_name("ray"))  # the command beside this Python

    def __enter__(self) -> RayCluster:
        before = set(process_tree(1))
        subprocess.run(
            [
                self.ray,
                "start",
                "--head",
                f"--num-cpus={os.cpu_count()}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--port=6390",
            ],
            check=True,
            capture_output=True,
        )
        # "auto": the cluster `ray start` last started here, with the token it made (an
        # address given as host:port is refused for want of that token).
        self.address = "auto"
        # Its daemons (GCS, raylet, monitors); the workers they start are their descendants.
        self.roots = sorted(set(process_tree(1)) - before)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([self.ray, "stop", "--force"], capture_output=True)


def photo_sources(cifar: Path, count: int) -> list[Path]:
    """`count` CIFAR images spread evenly over the sorted folder, to be made into photos."""
    every = sorted(cifar.glob("*/*.jpg"))
    return every[:: max(1, len(every) // count)][:count]


def make_photo(source: Path, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """A JPEG of size (height, width) that compresses and decodes like a photograph: the CIFAR
    image scaled up, with grain added, at quality 90."""
    import cv2

    image = cv2.resize(cv2.imread(str(source)), size[::-1], interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, image.shape)
    photo = np.clip(image.astype(np.float32) + grain, 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def make_photos(cifar: Path, out: Path, count: int, size=(768, 1024)) -> Path:
    """`count` photo JPEGs (make_photo) of size (height, width) under `out`, once."""
    marker = out / f".complete-{count}"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, source in enumerate(photo_sources(cifar, count)):
        folder = out / source.parent.name
        folder.mkdir(exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(make_photo(source, size, rng))
    marker.touch()
    return out


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_set(name: str, folder: Path, model: str, rounds: int, kinds: list[str], work: Path):
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    paths_file = work / f"{name}-paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    results: dict[str, list[dict]] = {kind: [] for kind in ["limit", *kinds]}
    loads = []

    def classify(kind: str, source: Path, cluster=None, label=True) -> dict:
        wait_for_quiet()
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            out = Path(tmp) / "results.parquet"
            answer = measure(
                ["classify", str(source), model, str(out), kind, str(BATCH)], cluster=cluster
            )
            if label:
                answer["labels"] = labels_of(out)
        print(f"  {kind} {answer | {'labels': '...'}}", file=sys.stderr, flush=True)
        return answer

    few = work / f"{name}-few.txt"
    few.write_text("\n".join(paths[:BATCH]) + "\n")
    if "ray" in kinds:
        # No cluster: the command starts Ray on this machine, and stops it, itself.
        results["ray_alone"] = [classify("ray", folder)]
    with RayCluster() if "ray" in kinds else contextlib.nullcontext() as cluster:
        if cluster is not None:
            # The first job on a fresh cluster also starts Ray Data's own actors, which stay.
            results["ray_first"] = [classify("ray", few, cluster, label=False)]
        for r in range(rounds):
            loads.append(load_average())
            print(f"{name} round {r + 1}: load {loads[-1]}", file=sys.stderr, flush=True)
            wait_for_quiet()
            results["limit"].append(measure(["limit", str(paths_file), model, str(BATCH)]))
            print(f"  limit {results['limit'][-1]}", file=sys.stderr, flush=True)
            for kind in kinds:
                results[kind].append(classify(kind, folder, cluster if kind == "ray" else None))
            if cluster is not None:
                # Ray's cost a job whatever its size (joining, the actor pool starting, the
                # plan), measured on one batch's worth of images from a list.
                results.setdefault("ray_few", []).append(classify("ray", few, cluster, False))
    return {"name": name, "images": len(paths), "results": results, "loads": loads}


def labels_of(out: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["path", "label"])
    return dict(
        zip(table.column("path").to_pylist(), table.column("label").to_pylist(), strict=True)
    )


def report(sets: list[dict], command: str, started: str) -> str:
    import onnxruntime
    import pyarrow

    versions = [
        f"ONNX Runtime {onnxruntime.__version__}",
        f"NumPy {np.__version__}",
        f"OpenCV {__import__('cv2').__version__}",
        f"pyarrow {pyarrow.__version__}",
    ]
    try:
        import ray

        versions.append(f"Ray {ray.__version__}")
    except ImportError:
        pass
    lines = [
        "# Bulk classification benchmark",
        "",
        f"Command: `{command}`",
        f"Run at {started} UTC; every figure below is from this run.",
        "",
        f"- CPU: {cpu_description()}",
        f"- {platform.platform()}, Python {platform.python_version()}",
        f"- {', '.join(versions)}",
        "",
    ]
    for data in sets:
        lines += table_for(data)
    return "\n".join(lines) + "\n"


def table_for(data: dict) -> list[str]:
    results = data["results"]
    limit = statistics.median(r["rate_with_decoding"] for r in results["limit"])
    model_only = statistics.median(r["rate"] for r in results["limit"])
    decode_s = statistics.median(r["decode_cpu_s"] for r in results["limit"])
    default_s = statistics.median(r["decode_default_cpu_s"] for r in results["limit"])
    held = all(r["buffers_held"] for r in results["limit"])
    lines = [
        f"## {data['title']}",
        "",
        f"{data['images']:,} JPEGs; load average (1, 5, 15 min) before each round: "
        f"{'; '.join(data['loads'])}.",
        "",
        f"- **In-process limit: {limit:,.0f} images/s** (median), the targets' yardstick: the "
        f"same predictor in one process on the same files, two threads each reading, decoding "
        f"and classifying a batch of {BATCH} in its own ONNX Runtime session, and nothing else "
        "(no listing, ranking or writing).",
        f"- Model alone: **{model_only:,.0f} images/s** on images decoded beforehand and held in "
        f"memory (median; one session on both cores "
        f"{statistics.median(r['rate_one_session'] for r in results['limit']):,.0f}, two "
        f"one-thread sessions from two threads "
        f"{statistics.median(r['rate_two_sessions'] for r in results['limit']):,.0f}; the "
        "better one), what no run that decodes can reach.",
        f"- Decode cost: {decode_s * 1e3:.3f} ms of CPU an image on one thread "
        f"(images.load_image, read, decode and resize to the input size), "
        + (
            f"with its buffers held as both engines hold them; {default_s * 1e3:.3f} ms with "
            "the C library's malloc as it comes (the first 200 images, measured before)."
            if held
            else "the C library's malloc as it comes (not glibc: the buffers are not held)."
        ),
        "",
        "| run | images/s (median) | of limit | of model alone | per round | "
        "CPU ms an image (all processes) | others' load, cores | "
        "peak memory (PSS, all processes) | labels as local |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    local_labels = results["local"][0]["labels"] if "local" in results else None
    lim_peak = statistics.median(r["peak_mb"] for r in results["limit"])
    lim_rounds = ", ".join(f"{r['rate_with_decoding']:,.0f}" for r in results["limit"])
    model_rounds = ", ".join(f"{r['rate']:,.0f}" for r in results["limit"])
    lim_cpu = statistics.median(r["cpu_ms"] for r in results["limit"])
    lines.append(
        f"| in-process limit (decoding) | {limit:,.0f} | 100% | {limit / model_only:.0%} | "
        f"{lim_rounds} | | {others(results['limit'])} | "
        f"{lim_peak:,.0f} MB (with all images decoded in memory for the model-alone run) | |"
    )
    lines.append(
        f"| model alone (pre-decoded) | {model_only:,.0f} | | 100% | {model_rounds} | "
        f"{lim_cpu:.3f} | | | |"
    )
    for kind in [k for k in ("local", "ray") if k in results]:
        runs = results[kind]
        rate = statistics.median(r["rate"] for r in runs)
        per_round = ", ".join(
            f"{r['rate']:,.0f} ({r['rate'] / lr['rate_with_decoding']:.0%})"
            for r, lr in zip(runs, results["limit"], strict=True)
        )
        ratio = statistics.median(
            r["rate"] / lr["rate_with_decoding"]
            for r, lr in zip(runs, results["limit"], strict=True)
        )
        peak = statistics.median(r["peak_mb"] for r in runs)
        name = {"local": "local engine", "ray": "ray engine, a job on a running cluster"}[kind]
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        lines.append(
            f"| {name} | {rate:,.0f} | {rate / limit:.0%} (rounds' median {ratio:.0%}) | "
            f"{rate / model_only:.0%} | {per_round} | {cpu:.3f} | {others(runs)} | "
            f"{peak:,.0f} MB | {same_labels(runs, local_labels)} |"
        )
        if kind != "ray":
            continue
        if "ray_alone" in results:
            run = results["ray_alone"][0]
            lines.append(
                f"| ray engine, no cluster: the command starts and stops its own "
                f"({run['seconds']:.1f} s) | {run['rate']:,.0f} | {run['rate'] / limit:.0%} | "
                f"{run['rate'] / model_only:.0%} | | {run['cpu_ms']:.3f} | {others([run])} | "
                f"{run['peak_mb']:,.0f} MB | {same_labels([run], local_labels)} |"
            )
        if "ray_few" in results:
            # A job's fixed cost, from a job of one batch; the rate of the rest beyond it.
            fixed = statistics.median(r["seconds"] for r in results["ray_few"])
            first = results["ray_first"][0]["seconds"] if "ray_first" in results else None
            beyond = [
                (r["images"] - BATCH) / max(r["seconds"] - fixed, 1e-9)
                for r in runs
                if r["seconds"] > fixed
            ]
            if beyond:
                steady = statistics.median(beyond)
                rounds = ", ".join(f"{r['seconds']:.1f}" for r in results["ray_few"])
                first_text = f"; the cluster's first job {first:.1f} s" if first else ""
                lines.append(
                    f"| ray engine beyond its cost a job ({fixed:.1f} s, the time of a "
                    f"{BATCH}-image job: {rounds}{first_text}) | {steady:,.0f} | "
                    f"{steady / limit:.0%} | {steady / model_only:.0%} | | | | | |"
                )
    lines += [
        "",
        "Per round: images/s and, in brackets, the ratio to that round's limit (measured just "
        "before it); the median of those ratios is the steadier figure when the machine's "
        "speed drifts between rounds.",
        "",
    ]
    return lines


def same_labels(runs: list[dict], local_labels: dict | None) -> str:
    """How many of the local engine's labels the first of `runs` gave too."""
    if local_labels is None or "labels" not in runs[0]:
        return ""
    labels = runs[0]["labels"]
    agree = sum(labels.get(p) == label for p, label in local_labels.items())
    return f"{agree:,} / {len(local_labels):,}"


def others(runs: list[dict]) -> str:
    """Other users' CPU use during each round's run, in cores."""
    return ", ".join(f"{r['others_cores']:.2f}" for r in runs if "others_cores" in r)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "limit":
            answer = child_limit(rest[0], rest[1], int(rest[2]))
        else:
            answer = child_classify(*rest[:4], int(rest[4]))
        answer["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(answer))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of CIFAR-10 JPEGs")
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10"))
    parser.add_argument(
        "--photos", default="2000,5000", help="photo-sized sets to make, by count (comma-separated)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imagerec-bulk")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--sets", default="cifar,photos", help="which image sets to measure (cifar, photos)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bulk.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    args.work.mkdir(parents=True, exist_ok=True)
    kinds = ["local"] if args.no_ray else ["local", "ray"]
    chosen = args.sets.split(",")
    todo = [("CIFAR-sized JPEGs (32x32)", "cifar", args.data)] if "cifar" in chosen else []
    if "photos" in chosen:
        for count in (int(n) for n in args.photos.split(",")):
            folder = make_photos(args.data, args.work / f"photos-{count}", count)
            todo.append((f"Photo-sized JPEGs (1024x768), {count:,}", f"photos-{count}", folder))
    sets = []
    for title, name, folder in todo:
        data = run_set(name, folder, args.model, args.rounds, kinds, args.work)
        data["title"] = title
        sets.append(data)
    command = "python benchmarks/bulk.py " + " ".join(sys.argv[1:])
    args.out.write_text(report(sets, command, started))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Serving benchmark: in-process limits, then HTTP throughput and latency of `imagerec serve`
against a naive baseline (hug, model.predict per request, no batching), in one run.

    python benchmarks/serve.py [--model models/cifar10] [--requests 2000] [--threads 64]

Writes benchmarks/results/serve.md with the command line, the machine and library versions.
The load client is a separate process (`--client`): one thread and one keep-alive http.client
connection per concurrent client, raw image/jpeg bodies built once, so it stays light on CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "tests" / "fixtures" / "cifar_small").glob("*/*.jpg"))


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000.0, q)) if latencies else float("nan")


def run_client(url: str, concurrency: int, requests_total: int) -> dict:
    """Send `requests_total` raw-JPEG POSTs over `concurrency` keep-alive connections."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    bodies = [p.read_bytes() for p in SAMPLES]
    counter = iter(range(requests_total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[int] = []

    def worker():
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        mine, failed = [], []
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body = bodies[index % len(bodies)]
            started = time.perf_counter()
            connection.request(
                "POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"}
            )
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if response.status != 200:
                failed.append(response.status)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "throughput": len(latencies) / elapsed,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
    }


WRK_SCRIPT = """
local bodies, count = {}, 0
for path in string.gmatch(os.getenv("IMAGEREC_BENCH_FILES"), "[^;]+") do
  local file = io.open(path, "rb"); bodies[#bodies + 1] = file:read("*a"); file:close()
end
local headers = {["Content-Type"] = "image/jpeg"}
request = function()
  count = count + 1
  return wrk.format("POST", "/v1/predict", headers, bodies[count % #bodies + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50),
    latency:percentile(99)))
end
"""


def run_wrk(url: str, concurrency: int, seconds: float) -> dict:
    """wrk (C, epoll) as the load generator: a few percent of one core at these rates."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        env = {**os.environ, "IMAGEREC_BENCH_FILES": ";".join(str(p) for p in SAMPLES)}
        threads = min(CLIENT["wrk_threads"], concurrency)
        command = ["wrk", "-t", str(threads), "-c", str(concurrency)]
        command += ["-d", f"{seconds:.0f}s", "--timeout", "60s", "-s", script.name, url]
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    line = next(x for x in output.stdout.splitlines() if x.startswith("RESULT"))
    requests_done, duration_us, errors, p50_us, p99_us = map(int, line.split()[1:])
    return {
        "concurrency": concurrency,
        "requests": requests_done,
        "errors": errors,
        "throughput": requests_done / (duration_us / 1e6),
        "p50_ms": p50_us / 1000,
        "p99_ms": p99_us / 1000,
    }


def load(url: str, concurrency: int, requests_total: int) -> dict:
    """Run the client in its own process so it does not share the GIL with anything measured."""
    if CLIENT["kind"] == "wrk":
        return run_wrk(url, concurrency, CLIENT["seconds"])
    command = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)]
    output = subprocess.run(
        [*command, "--requests", str(requests_total)], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout)


CLIENT = {"kind": "python", "seconds": 10.0, "wrk_threads": 1}


def naive_app(model_path: str):
    """The seed's way: hug, decode, model.predict on every request, no batching."""
    from imagerec.bundle import Bundle
    from imagerec.hugcompat import hug
    from imagerec.images import decode_image, resize_image

    bundle = Bundle.load(model_path)
    api = hug.API("imagerec.naive_benchmark")
    flip = bundle.preprocess.tta == "flip"

    @hug.post("/v1/predict", api=api)
    def predict(body, top_k: hug.types.number = 3):
        """Classify one raw image body."""
        image = resize_image(decode_image(body.read()), bundle.preprocess.input_size)[None]
        probs = bundle.model.predict(image.astype(np.float32), verbose=0)
        if flip:
            probs = (
                probs + bundle.model.predict(image[:, :, ::-1].astype(np.float32), verbose=0)
            ) / 2
        order = np.argsort(-probs[0])[:top_k]
        return {"results": [{"label": bundle.labels[order[0]], "score": float(probs[0][order[0]])}]}

    @hug.get("/readyz", api=api)
    def readyz():
        return {"status": "ready"}

    return api


def serve_naive(model_path: str, port: int, threads: int) -> None:
    from imagerec.config import Settings
    from imagerec.server import make_server

    api = naive_app(model_path)
    settings = Settings(host="127.0.0.1", port=port, threads=threads)
    server = make_server(api.http.server(), settings)

    def stop(_signum, _frame):
        raise SystemExit(0)  # waitress's run() closes cleanly on SystemExit

    signal.signal(signal.SIGTERM, stop)
    server.run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    host, port = url.removeprefix("http://").split(":")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {limit_s} s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_server(command: list[str], url: str, levels: list[int], counts: dict[int, int]):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
        load(url, 4, 100)  # warm-up: connections, first-call paths
        rows = [load(url, level, counts[level]) for level in levels]
        rss = peak_rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return rows, rss


def in_process(model: str, max_batch: int, seconds: float, workers: int) -> dict:
    """The limit: decode + classify in batches of max_batch from as many threads as the
    server's batcher has workers (so both drive the model equally hard); and single-image
    latency."""
    from imagerec.images import decode_image
    from imagerec.predictor import Predictor, share_cores

    share_cores(workers)  # as the server does
    predictor = Predictor.from_path(model, max_batch=max_batch)
    predictor.warm_up()
    bodies = [p.read_bytes() for p in SAMPLES]
    batch_bodies = [bodies[i % len(bodies)] for i in range(max_batch)]
    prepared = np.stack([predictor.prepare(decode_image(b)) for b in batch_bodies])

    def timed_loop(step, per_call: int) -> float:
        done = [0] * workers
        deadline = time.perf_counter() + seconds

        def run(index: int) -> None:
            while time.perf_counter() < deadline:
                step()
                done[index] += per_call

        threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done) / (time.perf_counter() - started)

    batched = timed_loop(
        lambda: predictor.classify([decode_image(b) for b in batch_bodies]), max_batch
    )
    forward_only = timed_loop(lambda: predictor.predict_arrays(prepared), max_batch)
    single = []
    for i in range(300):
        started = time.perf_counter()
        predictor.classify([decode_image(bodies[i % len(bodies)])], 3)
        single.append(time.perf_counter() - started)
    return {
        "batched": batched,
        "forward_only": forward_only,
        "single_p50_ms": percentile_ms(single, 50),
        "single_p99_ms": percentile_ms(single, 99),
        "name": predictor.name,
        "version": predictor.version,
        "tta": predictor.tta,
    }


def machine() -> list[str]:
    import cv2
    import keras
    import tensorflow as tf

    return [
        f"- CPU: {cpu_description()}",
        f"- {platform.platform()}, Python {platform.python_version()}",
        f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, NumPy {np.__version__}, "
        f"OpenCV {cv2.__version__}",
        f"- hug {_version('hug')}, falcon {_version('falcon')}, waitress "
        f"{_version('waitress')}, prometheus-client {_version('prometheus-client')}",
    ]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


CLIENT_TEXT = {
    "wrk": "wrk (one thread unless --wrk-threads; one keep-alive connection per concurrent "
    "client, for --load-seconds per level)",
    "python": "a separate Python process, one thread and one keep-alive http.client connection "
    "per concurrent client",
}


def report(args, limits: dict, served: list[dict], naive: list[dict], rss: float) -> str:
    def table(rows: list[dict]) -> list[str]:
        lines = [
            "| concurrency | requests | errors | images/s | p50 ms | p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput']:.0f} "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
        return lines

    by_level = {r["concurrency"]: r for r in served}
    naive_by_level = {r["concurrency"]: r for r in naive}
    limit = limits["batched"]
    checks = []
    if 64 in by_level:
        share = by_level[64]["throughput"] / limit
        checks.append(f"concurrency 64 at {share:.0%} of the in-process limit (target 85%)")
    if 16 in by_level:
        share = by_level[16]["throughput"] / limit
        checks.append(f"concurrency 16 at {share:.0%} of the in-process limit (target 70%)")
    top = max(by_level)
    if top in naive_by_level:
        ratio = by_level[top]["throughput"] / naive_by_level[top]["throughput"]
        checks.append(f"{ratio:.1f}x the naive baseline at concurrency {top} (target 10x)")
    if 1 in by_level:
        gap = by_level[1]["p50_ms"] - limits["single_p50_ms"]
        checks.append(f"p50 at concurrency 1 is {gap:+.2f} ms over in-process (target 2 ms)")
    checks.append(f"server peak memory (VmHWM) {rss:.0f} MB (target under 1024 MB)")
    return "\n".join(
        [
            "# Serving benchmark",
            "",
            f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
            "",
            *machine(),
            "",
            f"Model: {limits['name']} (version {limits['version']}, test-time augmentation "
            f"{limits['tta']}). Server: `imagerec serve --threads {args.threads}`, "
            f"max batch {args.max_batch}, max wait {args.max_wait_ms} ms, "
            f"{args.batch_workers} batcher workers, Python threads on "
            f"{f'{args.http_cores} CPU' if args.http_cores else 'every CPU'} "
            "(IMAGEREC_HTTP_CORES).",
            f"Client: {CLIENT_TEXT[args.load]}, raw image/jpeg bodies of the 80 CIFAR fixture "
            "JPEGs (tests/fixtures/cifar_small), sharing the machine's cores with the server.",
            "",
            "## In process (the limit)",
            "",
            f"- decode + classify in batches of {args.max_batch}, {args.batch_workers} threads: "
            f"{limit:.0f} images/s",
            f"- forward pass alone, batches of {args.max_batch}, {args.batch_workers} threads: "
            f"{limits['forward_only']:.0f} images/s",
            f"- one image, decode + classify: p50 {limits['single_p50_ms']:.2f} ms, "
            f"p99 {limits['single_p99_ms']:.2f} ms",
            "",
            "## HTTP, imagerec serve (micro-batched)",
            "",
            *table(served),
            "",
            "## HTTP, naive baseline (hug, model.predict per request, no batching)",
            "",
            *table(naive),
            "",
            "## Against the targets",
            "",
            *[f"- {line}" for line in checks],
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10"))
    parser.add_argument("--requests", type=int, default=3000, help="per concurrency level")
    parser.add_argument("--naive-requests", type=int, default=300, help="per level, baseline")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=64, help="waitress threads")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--batch-workers", type=int, default=2, help="micro-batcher threads")
    parser.add_argument(
        "--http-cores", type=int, default=1, help="CPUs for the server's Python threads (0: all)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per in-process figure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.md")
    parser.add_argument(
        "--load",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator: wrk (apt-get install wrk; the default when present) or python",
    )
    parser.add_argument("--load-seconds", type=float, default=10.0, help="per level, with wrk")
    parser.add_argument(
        "--wrk-threads", type=int, default=1, help="one epoll thread drives 64 connections"
    )
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.client:
        print(json.dumps(run_client(args.client, int(args.concurrency), args.requests)))
        return 0
    if args.naive_server:
        serve_naive(args.model, args.naive_server, args.threads)
        return 0

    CLIENT.update(kind=args.load, seconds=args.load_seconds, wrk_threads=args.wrk_threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"in-process figures ({args.seconds:.0f} s each)...", file=sys.stderr)
    limits = in_process(args.model, args.max_batch, args.seconds, args.batch_workers)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "imagerec.cli", "serve", "--model", args.model]
    serve += ["--port", str(port), "--threads", str(args.threads)]
    os.environ["IMAGEREC_MAX_BATCH"] = str(args.max_batch)
    os.environ["IMAGEREC_MAX_WAIT_MS"] = str(args.max_wait_ms)
    os.environ["IMAGEREC_BATCH_WORKERS"] = str(args.batch_workers)
    os.environ["IMAGEREC_HTTP_CORES"] = str(args.http_cores)
    print("imagerec serve...", file=sys.stderr)
    served, rss = measure_server(serve, url, levels, dict.fromkeys(levels, args.requests))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    naive_command = [sys.executable, __file__, "--model", args.model]
    naive_command += ["--naive-server", str(port), "--threads", str(args.threads)]
    print("naive baseline...", file=sys.stderr)
    naive, _ = measure_server(
        naive_command, url, levels, dict.fromkeys(levels, args.naive_requests)
    )

    text = report(args, limits, served, naive, rss)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

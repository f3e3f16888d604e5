"""Serving benchmark, in one run: the in-process limit of every engine, then HTTP throughput
and latency of `imagerec serve` for each front and engine at 1, 16 and 64 clients, with the
earlier configuration (waitress + TensorFlow) as the baseline row, server start-up time and
memory, and a slow-client row per front (2,000 trickling connections open). The servers named
by --grpc-servers also open their gRPC port, and are measured at each level once more over
HTTP/1.1 and over gRPC (Open Inference Protocol v2 ModelInfer), with the same client program and
the same image, so the two protocols compare like for like.

    python benchmarks/serve.py [--model models/cifar10] [--load-seconds 10]

Writes benchmarks/results/serve.md with the command line, the machine and library versions.
The load generator is wrk (C, one epoll thread) when it is installed, else a separate Python
process (`--client`) with one thread and keep-alive connection per client. The protocol rows
use h2load (nghttp2's C load generator: HTTP/1.1 with --h1, gRPC as HTTP/2 POSTs of a framed
message) when it is installed, else a Python process (`--grpc-client`, grpc.aio).
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
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import slow_clients
from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "tests" / "fixtures" / "cifar_small").glob("*/*.jpg"))


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000.0, q)) if latencies else float("nan")


def run_client(url: str, concurrency: int, requests_total: int, one_image: bool = False) -> dict:
    """Send `requests_total` raw-JPEG POSTs over `concurrency` keep-alive connections."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    bodies = [p.read_bytes() for p in (SAMPLES[:1] if one_image else SAMPLES)]
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


GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def infer_request_bytes(model: str, image: bytes) -> bytes:
    """A serialized ModelInferRequest for one encoded image, as tritonclient sends it."""
    import struct

    from imagerec.protocols.grpc_messages import messages

    request = messages("inference").ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return request.SerializeToString()


def run_h2load(
    url: str, concurrency: int, seconds: float, body: Path, headers: list[str], h1: bool = False
) -> dict:
    """h2load as the load generator: HTTP/1.1 with `h1`, else HTTP/2 without TLS (as gRPC)."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "requests.tsv"
        command = ["h2load", *(["--h1"] if h1 else []), "-c", str(concurrency), "-m", "1"]
        command += ["-t", "1"]
        command += ["-D", f"{seconds:.0f}", "-d", str(body), f"--log-file={log}"]
        for header in headers:
            command += ["-H", header]
        output = subprocess.run([*command, url], capture_output=True, text=True, check=True)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    finished = next(x for x in output.stdout.splitlines() if x.startswith("finished in"))
    elapsed = float(finished.split()[2].rstrip("s,"))
    durations = [int(r[2]) / 1e6 for r in rows]
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "errors": sum(1 for r in rows if r[1] != "200"),
        "throughput": len(rows) / elapsed,
        "p50_ms": percentile_ms(durations, 50),
        "p99_ms": percentile_ms(durations, 99),
    }


def run_grpc_client(address: str, concurrency: int, requests_total: int, body: bytes) -> dict:
    """`requests_total` ModelInfer calls from `concurrency` grpc.aio tasks on one channel."""
    import asyncio

    import grpc

    async def main() -> dict:
        latencies: list[float] = []
        errors = 0
        remaining = iter(range(requests_total))
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(GRPC_METHOD)

            async def worker():
                nonlocal errors
                while next(remaining, None) is not None:
                    started = time.perf_counter()
                    try:
                        await call(body)
                    except grpc.aio.AioRpcError:
                        errors += 1
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        return {
            "concurrency": concurrency,
            "requests": len(latencies),
            "errors": errors,
            "throughput": len(latencies) / elapsed,
            "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99),
        }

    return asyncio.run(main())


def grpc_failures(url: str) -> float:
    """ModelInfer calls the server answered with an error so far (its /metrics): h2load sees
    gRPC's status only in trailers, so errors are counted on the server's side."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("imagerec_grpc_requests_total{")
        and f'method="{GRPC_METHOD}"' in line
        and 'code="OK"' not in line
    )


def protocol_rows(url: str, grpc_port: int, levels: list[int], args, model_name: str) -> list:
    """HTTP/1.1 /v1/predict and gRPC ModelInfer at each level, one image, one client program."""
    image = SAMPLES[0].read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        message = infer_request_bytes(model_name, image)
        framed = Path(scratch) / "infer.grpc"  # gRPC's framing: flag byte, 4-byte length
        framed.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
        jpeg = Path(scratch) / "image.jpg"
        jpeg.write_bytes(image)
        for level in levels:
            if CLIENT["protocols"] == "h2load":
                http_row = run_h2load(
                    url + "/v1/predict",
                    level,
                    CLIENT["seconds"],
                    jpeg,
                    ["content-type: image/jpeg"],
                    h1=True,
                )
                before = grpc_failures(url)
                grpc_row = run_h2load(
                    f"http://127.0.0.1:{grpc_port}{GRPC_METHOD}",
                    level,
                    CLIENT["seconds"],
                    framed,
                    ["content-type: application/grpc", "te: trailers"],
                )
                grpc_row["errors"] += int(grpc_failures(url) - before)
            else:
                http_row = json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--client", url, "--concurrency", str(level)]
                        + ["--requests", str(args.requests), "--one-image"],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                command = [sys.executable, __file__, "--grpc-client", f"127.0.0.1:{grpc_port}"]
                command += ["--concurrency", str(level), "--requests", str(args.requests)]
                command += ["--grpc-body", str(framed.with_suffix(".pb"))]
                framed.with_suffix(".pb").write_bytes(message)
                grpc_row = json.loads(
                    subprocess.run(command, capture_output=True, text=True, check=True).stdout
                )
            rows.append({"protocol": "HTTP/1.1 /v1/predict", **http_row})
            rows.append({"protocol": "gRPC ModelInfer", **grpc_row})
    return rows


def load(url: str, concurrency: int, requests_total: int) -> dict:
    """Run the client in its own process so it does not share the GIL with anything measured."""
    if CLIENT["kind"] == "wrk":
        return run_wrk(url, concurrency, CLIENT["seconds"])
    command = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)]
    output = subprocess.run(
        [*command, "--requests", str(requests_total)], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout)


CLIENT = {"kind": "python", "seconds": 10.0, "wrk_threads": 1, "protocols": "python"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, limit_s: float = 300) -> float:
    """Seconds until `url`/readyz answers 200."""
    started = time.monotonic()
    host, port = url.removeprefix("http://").split(":")
    while time.monotonic() < started + limit_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} was not ready within {limit_s} s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Granian's worker is a child of the `imagerec serve` process)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            pids.extend(process_tree(int(child)))
    return pids


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) in MB, summed over the server's processes."""
    now = peak = 0.0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now += int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak += int(line.split()[1]) / 1024
    return now, peak


def loads_tensorflow(pid: int) -> bool:
    """Whether any of the server's processes has TensorFlow's library mapped."""
    for member in process_tree(pid):
        if "libtensorflow" in Path(f"/proc/{member}/maps").read_text():
            return True
    return False


def measure_server(config: dict, args, levels: list[int]) -> dict:
    """Start `imagerec serve` with one front and engine, time its start-up, load it at each
    level, then hold the slow clients open (if asked); stop it with SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "imagerec.cli", "serve", "--model", str(config["model"])]
    command += ["--port", str(port), "--threads", str(args.threads)]
    command += ["--front", config["front"], "--engine", config["engine"]]
    grpc_port = free_port() if config.get("grpc") else 0
    command += ["--grpc-port", str(grpc_port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        startup = wait_ready(url, process)
        idle_mb, _ = memory_mb(process.pid)
        load(url, 4, 100)  # warm-up: connections, first-call paths
        rows = [load(url, level, args.requests) for level in levels]
        name = Path(config["model"]).name
        protocols = protocol_rows(url, grpc_port, levels, args, name) if grpc_port else []
        rss, peak = memory_mb(process.pid)
        tensorflow = loads_tensorflow(process.pid)
        slow = (
            slow_clients.measure(url, args.slow_clients, args.slow_seconds)
            if config["slow"]
            else None
        )
        if slow is not None:
            slow["server_alive"] = process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return {
        **config,
        "rows": rows,
        "protocols": protocols,
        "startup_s": startup,
        "idle_mb": idle_mb,
        "rss_mb": rss,
        "peak_mb": peak,
        "tensorflow_loaded": tensorflow,
        "slow": slow,
    }


def in_process(model: Path, engine: str, max_batch: int, seconds: float, workers: int) -> dict:
    """The limit: decode + classify in batches of max_batch from as many threads as the
    server's batcher has workers (so both drive the model equally hard), the forward pass alone,
    and single-image latency. Each engine in its own process, as the server would have it."""
    command = [sys.executable, __file__, "--in-process", engine, "--model", str(model)]
    command += ["--max-batch", str(max_batch), "--seconds", str(seconds)]
    command += ["--batch-workers", str(workers)]
    output = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.splitlines()[-1])


def in_process_figures(model: str, engine: str, max_batch: int, seconds: float, workers: int):
    from imagerec.images import decode_image
    from imagerec.predictor import Predictor

    predictor = Predictor.from_path(model, max_batch=max_batch, engine=engine, workers=workers)
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
        "engine": predictor.engine,
        "batched": batched,
        "forward_only": forward_only,
        "single_p50_ms": percentile_ms(single, 50),
        "single_p99_ms": percentile_ms(single, 99),
        "name": predictor.name,
        "version": predictor.version,
        "tta": predictor.tta,
    }


def with_every_engine(model: Path, work: Path) -> Path:
    """A copy of the bundle that also holds the float32 ONNX model (the bundled one ships only
    the int8 one), so that every engine can be measured on the same weights."""
    from imagerec.bundle import Bundle, add_to_bundle
    from imagerec.export import ENGINE_FILES, keras_to_onnx

    copy = work / model.name
    shutil.copytree(model, copy)
    if not (copy / ENGINE_FILES["onnx"]).exists():
        bundle = Bundle.load(copy)
        onnx = keras_to_onnx(bundle.model, bundle.preprocess.input_size)
        add_to_bundle(copy, {ENGINE_FILES["onnx"]: onnx}, bundle.metrics)
    return copy


def machine() -> list[str]:
    import cv2
    import keras
    import onnxruntime
    import tensorflow as tf

    return [
        f"- CPU: {cpu_description()}",
        f"- {platform.platform()}, Python {platform.python_version()}",
        f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, ONNX Runtime "
        f"{onnxruntime.__version__}, NumPy {np.__version__}, OpenCV {cv2.__version__}",
        f"- hug-upgraded {_version('hug-upgraded')}, falcon {_version('falcon')}, granian "
        f"{_version('granian')}, waitress {_version('waitress')}",
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
PROTOCOL_TEXT = {
    "h2load": "h2load (nghttp2's C load generator, one thread, one connection per client, one "
    "call in flight on each, for --load-seconds per level)",
    "python": "a separate Python process (HTTP: one thread and http.client connection per "
    "client; gRPC: one grpc.aio task per client on one channel)",
}
BASELINE = ("waitress", "tensorflow")
SLOW_CLIENT_ROWS = (BASELINE, ("granian", "onnx-int8"))  # the earlier server and the new one


def merge_levels(tables: list[list[dict]], labels: tuple[str, ...]) -> list[dict]:
    """One server's rows of every round, level by level: totals of requests and errors,
    medians of throughput and latency; `labels` are copied from the first round."""
    merged = []
    for level_rows in zip(*tables, strict=True):
        row = {key: level_rows[0][key] for key in labels}
        row["requests"] = sum(r["requests"] for r in level_rows)
        row["errors"] = sum(r["errors"] for r in level_rows)
        for key in ("throughput", "p50_ms", "p99_ms"):
            row[key] = float(np.median([r[key] for r in level_rows]))
        merged.append(row)
    return merged


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Each server's figures over the rounds: medians of throughput, latency and memory."""
    merged = []
    for runs in zip(*rounds, strict=True):
        numbers = {
            key: float(np.median([run[key] for run in runs]))
            for key in ("startup_s", "idle_mb", "rss_mb", "peak_mb")
        }
        merged.append(
            {
                **runs[0],
                **numbers,
                "rows": merge_levels([run["rows"] for run in runs], ("concurrency",)),
                "protocols": merge_levels(
                    [run["protocols"] for run in runs], ("protocol", "concurrency")
                ),
                "tensorflow_loaded": any(run["tensorflow_loaded"] for run in runs),
            }
        )
    return merged


def round_ratios(rounds: list[list[dict]], best: tuple[str, str], level: int) -> list[float]:
    """`best`'s throughput over the baseline's at `level`, within each round."""
    ratios = []
    for served in rounds:
        by = {(s["front"], s["engine"]): {r["concurrency"]: r for r in s["rows"]} for s in served}
        if best in by and level in by[BASELINE]:
            ratios.append(by[best][level]["throughput"] / by[BASELINE][level]["throughput"])
    return ratios


def report(args, limits: dict[str, dict], served: list[dict], rounds: list[list[dict]]) -> str:
    baseline = next(s for s in served if (s["front"], s["engine"]) == BASELINE)
    base_by_level = {r["concurrency"]: r for r in baseline["rows"]}
    reference = limits["tensorflow"]["batched"]
    any_limit = next(iter(limits.values()))
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; every figure below is from this run.",
        "",
        *machine(),
        "",
        f"Model: {any_limit['name']} (test-time augmentation {any_limit['tta']}), the same "
        f"weights in every engine. Server: `imagerec serve --threads {args.threads} --front F "
        f"--engine E`, max batch {args.max_batch}, max wait {args.max_wait_ms} ms, "
        f"{args.batch_workers} batcher workers.",
        f"Client: {CLIENT_TEXT[args.load]}, raw image/jpeg bodies of the 80 CIFAR fixture "
        "JPEGs (tests/fixtures/cifar_small), sharing the machine's cores with the server.",
        "",
        "## In process (the limit of each engine)",
        "",
        f"Decode + classify in batches of {args.max_batch} from {args.batch_workers} threads, "
        "the forward pass alone, and one image at a time.",
        "",
        "| engine | images/s | x TensorFlow | forward only | one image p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, limit in limits.items():
        lines.append(
            f"| {name} | {limit['batched']:.0f} | {limit['batched'] / reference:.2f} "
            f"| {limit['forward_only']:.0f} | {limit['single_p50_ms']:.2f} "
            f"| {limit['single_p99_ms']:.2f} |"
        )
    lines += [
        "",
        "## HTTP, each front and engine",
        "",
        f"Each server was measured {len(rounds)} times, the servers in turn (round 1: every "
        "server, then round 2, ...); requests and errors are totals over the rounds, the other "
        "figures medians. x baseline: images/s over the baseline row's (waitress + tensorflow, "
        "the configuration before the compiled front and the ONNX engines) at the same "
        "concurrency; of limit: "
        "over that engine's in-process limit above.",
        "",
        "| front | engine | clients | requests | errors | images/s | x baseline | of limit "
        "| p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in served:
        limit = limits[server["engine"]]["batched"]
        for r in server["rows"]:
            base = base_by_level[r["concurrency"]]["throughput"]
            lines.append(
                f"| {server['front']} | {server['engine']} | {r['concurrency']} | {r['requests']} "
                f"| {r['errors']} | {r['throughput']:.0f} | {r['throughput'] / base:.2f} "
                f"| {r['throughput'] / limit:.0%} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
    with_grpc = [s for s in served if s["protocols"]]
    if with_grpc:
        lines += [
            "",
            "## gRPC beside HTTP",
            "",
            "The same server, after its rows above, with its gRPC port open: "
            f"{PROTOCOL_TEXT[args.protocol_load]}, "
            "for HTTP/1.1 (a raw image/jpeg POST to /v1/predict) and for gRPC (an Open "
            "Inference Protocol v2 ModelInfer call carrying the image as BYTES in "
            "raw_input_contents), one image per call, the same JPEG every time "
            f"({SAMPLES[0].relative_to(ROOT)}). x HTTP: gRPC's images/s over HTTP/1.1's at the "
            "same level, within each round, median. gRPC errors: calls the server answered with "
            "an error status (its imagerec_grpc_requests_total), besides any h2load saw.",
            "",
            "| front | engine | protocol | clients | requests | errors | images/s | x HTTP "
            "| p50 ms | p99 ms |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ratios = grpc_ratios(rounds)
        for server in with_grpc:
            for r in server["protocols"]:
                key = (server["front"], server["engine"], r["concurrency"])
                shown = f"{ratios[key]:.2f}" if r["protocol"].startswith("gRPC") else "1.00"
                lines.append(
                    f"| {server['front']} | {server['engine']} | {r['protocol']} "
                    f"| {r['concurrency']} | {r['requests']} | {r['errors']} "
                    f"| {r['throughput']:.0f} | {shown} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
                )
    lines += [
        "",
        "## Start-up and memory",
        "",
        "Start-up: from starting `imagerec serve` to /readyz answering 200 (model loaded and "
        "warm). Memory: resident set of the server's processes (Granian's supervisor and worker "
        "together), idle once ready, and after the load above (now / peak).",
        "",
        "| front | engine | start-up s | idle MB | after load MB | peak MB | TensorFlow loaded |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for server in served:
        lines.append(
            f"| {server['front']} | {server['engine']} | {server['startup_s']:.1f} "
            f"| {server['idle_mb']:.0f} | {server['rss_mb']:.0f} | {server['peak_mb']:.0f} "
            f"| {'yes' if server['tensorflow_loaded'] else 'no'} |"
        )
    slow_rows = [s for s in served if s["slow"]]
    if slow_rows:
        lines += [
            "",
            "## Slow clients",
            "",
            f"{args.slow_clients} connections that send a request line and then one header byte "
            f"a second, held open for {args.slow_seconds:.0f} s while other requests are sent one "
            "at a time on fresh connections.",
            "",
            "| front | engine | slow opened | refused | closed by server | other requests "
            "| failed | p50 ms | max ms | server alive |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for server in slow_rows:
            slow = server["slow"]
            lines.append(
                f"| {server['front']} | {server['engine']} | {slow['slow_opened']} "
                f"| {slow['slow_refused']} | {slow['slow_closed_by_server']} | {slow['requests']} "
                f"| {slow['failed']} | {slow['p50_ms']:.1f} | {slow['max_ms']:.1f} "
                f"| {'yes' if slow['server_alive'] else 'no'} |"
            )
    lines += ["", "## Against the targets", "", *[f"- {c}" for c in checks(limits, served)]]
    per_round = round_ratios(rounds, ("granian", "onnx-int8"), 64)
    if per_round:
        shown = ", ".join(f"{r:.2f}x" for r in per_round)
        lines.append(
            f"- granian + onnx-int8 over the baseline at 64 clients, round by round: {shown}"
        )
    lines.append("")
    return "\n".join(lines)


def grpc_ratios(rounds: list[list[dict]]) -> dict[tuple[str, str, int], float]:
    """gRPC's throughput over HTTP/1.1's, per server and level: the median of each round's."""
    found: dict[tuple[str, str, int], list[float]] = {}
    for served in rounds:
        for server in served:
            by_level: dict[int, dict[str, float]] = {}
            for r in server["protocols"]:
                kind = "grpc" if r["protocol"].startswith("gRPC") else "http"
                by_level.setdefault(r["concurrency"], {})[kind] = r["throughput"]
            for level, pair in by_level.items():
                key = (server["front"], server["engine"], level)
                found.setdefault(key, []).append(pair["grpc"] / pair["http"])
    return {key: float(np.median(values)) for key, values in found.items()}


def checks(limits: dict[str, dict], served: list[dict]) -> list[str]:
    found = []
    if "onnx-int8" in limits:
        ratio = limits["onnx-int8"]["batched"] / limits["tensorflow"]["batched"]
        found.append(f"in process, onnx-int8 at {ratio:.2f}x TensorFlow float32 (target 2.5x)")
    by_config = {
        (s["front"], s["engine"]): {r["concurrency"]: r for r in s["rows"]} for s in served
    }
    base = by_config[BASELINE]
    best = ("granian", "onnx-int8")
    if best in by_config and 64 in base:
        top = by_config[best][64]["throughput"]
        found.append(
            f"HTTP at 64 clients, granian + onnx-int8: {top / base[64]['throughput']:.2f}x the "
            f"baseline row (target 2.5x) and {top / limits['onnx-int8']['batched']:.0%} of its "
            "in-process limit (target 70%)"
        )
    if best in by_config and 1 in base:
        found.append(
            f"p50 at 1 client: {by_config[best][1]['p50_ms']:.2f} ms against the baseline's "
            f"{base[1]['p50_ms']:.2f} ms (target: no worse)"
        )
    for server in served:
        slow = server["slow"]
        if slow:
            found.append(
                f"{server['front']} with {slow['slow_opened']} trickling connections: other "
                f"requests at most {slow['max_ms']:.0f} ms, {slow['failed']} failed, "
                f"{slow['slow_refused']} refused (target: within 1 s, none refused)"
            )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10")
    parser.add_argument("--requests", type=int, default=3000, help="per level, Python client")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--threads", type=int, default=64, help="the server's Python threads")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--batch-workers", type=int, default=2, help="micro-batcher threads")
    parser.add_argument("--engines", default="tensorflow,onnx,onnx-int8")
    parser.add_argument(
        "--servers",
        default="waitress:tensorflow,waitress:onnx-int8,granian:tensorflow,granian:onnx,"
        "granian:onnx-int8",
        help="front:engine pairs; waitress:tensorflow is the baseline and always included",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="every server measured this many times, in turn, so that a drift of the machine "
        "reaches every row alike; the tables give the median",
    )
    parser.add_argument("--slow-clients", type=int, default=2000)
    parser.add_argument("--slow-seconds", type=float, default=15.0)
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
    parser.add_argument(
        "--grpc-servers",
        default="granian:onnx-int8",
        help="front:engine pairs (among --servers) that also open their gRPC port and are "
        "measured over HTTP/1.1 and gRPC with one client program; '' for none",
    )
    parser.add_argument(
        "--protocol-load",
        choices=["h2load", "python"],
        default="h2load" if shutil.which("h2load") else "python",
        help="the client of the gRPC-beside-HTTP rows: h2load (apt-get install nghttp2-client; "
        "the default when present) or python",
    )
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--one-image", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-client", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-body", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", metavar="ENGINE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.client:
        figures = run_client(args.client, int(args.concurrency), args.requests, args.one_image)
        print(json.dumps(figures))
        return 0
    if args.grpc_client:
        body = args.grpc_body.read_bytes()
        figures = run_grpc_client(args.grpc_client, int(args.concurrency), args.requests, body)
        print(json.dumps(figures))
        return 0
    if args.in_process:
        figures = in_process_figures(
            str(args.model), args.in_process, args.max_batch, args.seconds, args.batch_workers
        )
        print(json.dumps(figures))
        return 0

    CLIENT.update(kind=args.load, seconds=args.load_seconds, wrk_threads=args.wrk_threads)
    CLIENT.update(protocols=args.protocol_load)
    grpc_pairs = {tuple(p.split(":")) for p in args.grpc_servers.split(",") if p}
    levels = [int(c) for c in args.concurrency.split(",")]
    pairs = [tuple(p.split(":")) for p in args.servers.split(",")]
    if BASELINE not in pairs:
        pairs.insert(0, BASELINE)
    os.environ["IMAGEREC_MAX_BATCH"] = str(args.max_batch)
    os.environ["IMAGEREC_MAX_WAIT_MS"] = str(args.max_wait_ms)
    os.environ["IMAGEREC_BATCH_WORKERS"] = str(args.batch_workers)
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as work:
        model = with_every_engine(args.model, Path(work))
        limits = {}
        for engine in args.engines.split(","):
            print(f"in process, {engine} ({args.seconds:.0f} s a figure)...", file=sys.stderr)
            limits[engine] = in_process(
                model, engine, args.max_batch, args.seconds, args.batch_workers
            )
        rounds = []
        for number in range(args.rounds):
            served = []
            for front, engine in pairs:
                slow = number == 0 and (front, engine) in SLOW_CLIENT_ROWS
                print(
                    f"round {number + 1}: imagerec serve --front {front} --engine {engine}...",
                    file=sys.stderr,
                )
                config = {"front": front, "engine": engine, "model": model, "slow": slow}
                config["grpc"] = (front, engine) in grpc_pairs
                served.append(measure_server(config, args, levels))
            rounds.append(served)

    text = report(args, limits, median_rows(rounds), rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: the real server under mixed traffic for a long time, minute by minute.

    python benchmarks/soak.py [--minutes 10] [--clients 64]

`imagerec serve` (Granian, the bundled model, its gRPC port open) gets traffic from --clients
threads in two client processes: valid images of several sizes on every protocol (native
/v1/predict raw and multipart, Open Inference Protocol v2 REST and gRPC, TF Serving REST),
invalid requests (not an image, a truncated JPEG, a body over the limit) and clients that hang
up half-way through sending. Each minute: answers per second, p99 latency of the valid requests,
errors by kind (an answer other than the one the request calls for is unexpected), and the
server's memory. Writes benchmarks/results/soak.md and soak.png (the three lines over time).

Memory must level off after warm-up. The tolerance: from the end of --warmup-minutes to the
end, the worker's resident memory grows by no more than 1 MB a minute (least-squares slope of
the samples, taken every 5 s) and its last minute is within 5% of the first minute after
warm-up.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import random
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
CIFAR = sorted((ROOT / "tests" / "fixtures" / "cifar_small").glob("*/*.jpg"))
MODEL = ROOT / "models" / "cifar10"
SAMPLE_S = 5.0
MAX_BODY = 10 * 1024 * 1024
# (kind, weight, answer the request calls for)
KINDS = [
    ("native-raw", 30, 200),
    ("native-multipart-photo", 8, 200),
    ("v2-rest", 15, 200),
    ("v2-grpc", 15, "OK"),
    ("tfserving-rest", 12, 200),
    ("not-an-image", 6, 415),  # no known image format: 415, as documented
    ("truncated-jpeg", 6, 400),
    ("over-limit", 2, 413),
    ("hang-up", 6, None),  # no answer to wait for: the server must shrug it off
]


def photo(width: int, height: int, seed: int) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.resize(small, (width, height)))[1].tobytes()


def grpc_infer_body(image: bytes) -> bytes:
    import struct

    from imagerec.protocols.grpc_messages import messages

    request = messages("inference").ModelInferRequest(model_name="cifar10")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return request.SerializeToString()


def client_process(url: str, grpc_address: str, threads: int, until: float, out: str, seed: int):
    """Send requests from `threads` threads until `until`; write (time, kind, seconds, outcome)
    rows to `out`, outcome "ok", "expected" (the error the request calls for) or what came
    back instead."""
    import grpc
    import requests

    host, port = url.removeprefix("http://").split(":")
    cifar = [p.read_bytes() for p in CIFAR]
    photos = [photo(w, h, i) for i, (w, h) in enumerate([(640, 480), (1280, 960), (300, 200)])]
    grpc_bodies = [grpc_infer_body(image) for image in cifar[:20]]
    channel = grpc.insecure_channel(grpc_address)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    kinds = [k for k, _, _ in KINDS]
    weights = [w for _, w, _ in KINDS]
    wanted = {k: answer for k, _, answer in KINDS}
    rows: list[tuple] = []
    lock = threading.Lock()

    def hang_up(rng: random.Random) -> str:
        body = rng.choice(photos)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (
                f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[: len(body) // 2])
        return "expected"

    def one(session: requests.Session, kind: str, rng: random.Random) -> str:
        image = rng.choice(cifar)
        if kind == "hang-up":
            return hang_up(rng)
        if kind == "v2-grpc":
            try:
                infer(rng.choice(grpc_bodies), timeout=60)
                return "ok"
            except grpc.RpcError as exc:
                return f"grpc {exc.code().name}"
        if kind == "native-raw":
            answer = session.post(
                url + "/v1/predict", data=image, headers={"Content-Type": "image/jpeg"}
            )
        elif kind == "native-multipart-photo":
            answer = session.post(
                url + "/v1/predict", files={"image": ("p.jpg", rng.choice(photos), "image/jpeg")}
            )
        elif kind == "v2-rest":
            data = base64.b64encode(image).decode()
            tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
            answer = session.post(url + "/v2/models/cifar10/infer", json={"inputs": [tensor]})
        elif kind == "tfserving-rest":
            body = {"instances": [{"b64": base64.b64encode(image).decode()}]}
            answer = session.post(url + "/v1/models/cifar10:predict", json=body)
        elif kind == "not-an-image":
            answer = session.post(
                url + "/v1/predict", data=os.urandom(2000), headers={"Content-Type": "image/jpeg"}
            )
        elif kind == "truncated-jpeg":
            cut = rng.choice(photos)
            answer = session.post(
                url + "/v1/predict",
                data=cut[: len(cut) // 3],
                headers={"Content-Type": "image/jpeg"},
            )
        else:  # over-limit: refused from its Content-Length, before the body is read
            answer = session.post(
                url + "/v1/predict",
                data=b"\xff" * (MAX_BODY + 1),
                headers={"Content-Type": "image/jpeg"},
            )
        if answer.status_code == wanted[kind]:
            return "ok" if answer.status_code == 200 else "expected"
        return f"http {answer.status_code}"

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine = []
        with requests.Session() as session:
            while time.time() < until:
                kind = rng.choices(kinds, weights)[0]
                started = time.time()
                try:
                    outcome = one(session, kind, rng)
                except (requests.RequestException, OSError) as exc:
                    outcome = f"client {type(exc).__name__}: {str(exc)[:160]}"
                    session.close()
                mine.append((started, kind, time.time() - started, outcome))
        with lock:
            rows.extend(mine)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    channel.close()
    Path(out).write_text(json.dumps(rows))


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids.extend(process_tree(int(child)))
    return pids


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen) -> None:
    import requests

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server was not ready in 300 s")


def run(args) -> dict:
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "imagerec.cli", "serve", "--model", str(args.model)]
    command += ["--port", str(port), "--grpc-port", str(grpc_port)]
    log = open(args.log, "w")  # noqa: SIM115 (open for the server's whole life)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[tuple[float, float, float]] = []  # time, worker MB, all processes MB
    try:
        wait_ready(url, server)
        children = process_tree(server.pid)[1:]
        worker_pid = children[0] if children else server.pid
        started = time.time()
        until = started + args.minutes * 60
        scratch = Path(args.log).parent
        outs = [str(scratch / f"soak-client-{i}.json") for i in range(2)]
        clients = [
            multiprocessing.Process(
                target=client_process,
                args=(url, f"127.0.0.1:{grpc_port}", args.clients // 2, until, out, i),
            )
            for i, out in enumerate(outs)
        ]
        for client in clients:
            client.start()
        while time.time() < until:
            total = sum(rss_mb(pid) for pid in process_tree(server.pid))
            samples.append((time.time() - started, rss_mb(worker_pid), total))
            time.sleep(SAMPLE_S)
        for client in clients:
            client.join()
        rows = [row for out in outs for row in json.loads(Path(out).read_text())]
        alive = server.poll() is None
        ready = alive and _ready(url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()
    return {"rows": rows, "samples": samples, "started": started, "alive": alive, "ready": ready}


def _ready(url: str) -> bool:
    import requests

    return requests.get(url + "/readyz", timeout=30).status_code == 200


def per_minute(result: dict, minutes: int) -> list[dict]:
    table = []
    for minute in range(minutes):
        low, high = minute * 60, (minute + 1) * 60
        rows = [r for r in result["rows"] if low <= r[0] - result["started"] < high]
        valid = [r for r in rows if r[3] == "ok"]
        latencies = [r[2] for r in valid]
        unexpected: dict[str, int] = {}
        for row in rows:
            if row[3] not in ("ok", "expected"):
                key = f"{row[1]}: {row[3]}"
                unexpected[key] = unexpected.get(key, 0) + 1
        memory = [s for s in result["samples"] if low <= s[0] < high]
        table.append(
            {
                "minute": minute + 1,
                "requests": len(rows),
                "ok": len(valid),
                "expected_errors": sum(1 for r in rows if r[3] == "expected"),
                "unexpected": unexpected,
                "answers_per_s": len(valid) / 60,
                "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else float("nan"),
                "worker_mb": float(np.median([s[1] for s in memory])) if memory else float("nan"),
                "total_mb": float(np.median([s[2] for s in memory])) if memory else float("nan"),
            }
        )
    return table


def memory_verdict(result: dict, warmup_minutes: float) -> dict:
    after = [(t / 60, worker) for t, worker, _ in result["samples"] if t >= warmup_minutes * 60]
    minutes = np.array([m for m, _ in after])
    worker = np.array([w for _, w in after])
    slope = float(np.polyfit(minutes, worker, 1)[0]) if len(after) > 2 else float("nan")
    first = worker[minutes < warmup_minutes + 1]
    last = worker[minutes >= minutes.max() - 1]
    change = float(np.median(last) / np.median(first) - 1) if len(first) and len(last) else 0.0
    return {
        "slope_mb_per_min": slope,
        "last_vs_first": change,
        "flat": abs(slope) <= 1.0 and abs(change) <= 0.05,
    }


def plot(table: list[dict], samples: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    minutes = [row["minute"] - 0.5 for row in table]  # each minute's figure at its middle
    axes[0].plot(minutes, [row["answers_per_s"] for row in table], marker="o")
    axes[0].set_ylabel("valid answers / s")
    axes[1].plot(minutes, [row["p99_ms"] for row in table], marker="o", color="tab:orange")
    axes[1].set_ylabel("p99 latency, ms")
    axes[2].plot([t / 60 for t, _, _ in samples], [w for _, w, _ in samples], label="worker")
    axes[2].plot([t / 60 for t, _, _ in samples], [a for _, _, a in samples], label="all")
    axes[2].set_ylabel("resident memory, MB")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    figure.suptitle("imagerec serve under mixed traffic")
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def report(args, result: dict, table: list[dict], verdict: dict, load_before: str) -> str:
    unexpected_total = sum(sum(row["unexpected"].values()) for row in table)
    lines = [
        "# Soak: mixed traffic over time",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average before it: {load_before}.",
        "",
        f"- CPU: {cpu_description()}",
        f"- Server: `imagerec serve --model {args.model.relative_to(ROOT)} --grpc-port P` "
        "(Granian, the int8 ONNX engine), on the same machine as the clients.",
        f"- Clients: {args.clients} threads in two processes for {args.minutes} minutes; each "
        "request's kind drawn by weight: "
        + ", ".join(f"{kind} {weight}" for kind, weight, _ in KINDS)
        + ". Valid images: the 80 CIFAR fixture JPEGs, and 640x480, 1280x960 and 300x200 "
        "photos (multipart). hang-up sends the head and half the body of a photo, then closes.",
        "",
        "| minute | requests | valid answers/s | p99 ms (valid) | expected errors | unexpected "
        "| worker MB | all processes MB |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in table:
        unexpected = ", ".join(f"{k} x{v}" for k, v in row["unexpected"].items()) or "none"
        lines.append(
            f"| {row['minute']} | {row['requests']} | {row['answers_per_s']:.0f} "
            f"| {row['p99_ms']:.0f} | {row['expected_errors']} | {unexpected} "
            f"| {row['worker_mb']:.0f} | {row['total_mb']:.0f} |"
        )
    kinds: dict[str, int] = {}
    for row in result["rows"]:
        kinds[row[1]] = kinds.get(row[1], 0) + 1
    lines += [
        "",
        "Requests by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ".",
        "",
        "![throughput, p99 latency and memory per minute](soak.png)",
        "",
        "## Against the targets",
        "",
        f"- Unexpected errors: {unexpected_total} (target: none).",
        f"- Memory after the {args.warmup_minutes:g}-minute warm-up: the worker's resident set "
        f"changed by {verdict['slope_mb_per_min']:+.2f} MB a minute (least squares) and its last "
        f"minute was {verdict['last_vs_first']:+.1%} from its first (tolerance: 1 MB a minute "
        f"and 5%): {'flat' if verdict['flat'] else 'NOT flat'}.",
        f"- The server was alive and ready at the end: {result['alive'] and result['ready']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.md")
    parser.add_argument("--log", type=Path, default=Path("/tmp/imagerec-soak-serve.log"))
    args = parser.parse_args()
    args.model = args.model.resolve()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    result = run(args)
    table = per_minute(result, args.minutes)
    verdict = memory_verdict(result, args.warmup_minutes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(table, result["samples"], args.out.with_suffix(".png"))
    text = report(args, result, table, verdict, load_before)
    args.out.write_text(text)
    print(text)
    unexpected = any(row["unexpected"] for row in table)
    return 0 if verdict["flat"] and not unexpected and result["ready"] else 1


if __name__ == "__main__":
    sys.exit(main())

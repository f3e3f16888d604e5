"""Slow clients: many connections that send a request line, then trickle header bytes, held
open while other clients are timed. Used by benchmarks/serve.py and by the integration test.

    python benchmarks/slow_clients.py URL --connections 2000 --seconds 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

CONNECT_SECONDS = 20.0
SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "samples" / "cat.jpg"


def trickle(host: str, port: int, connections: int, stop: threading.Event, opened: list) -> None:
    """Open `connections` sockets that each send a request line and one header byte a second,
    never finishing their headers, until `stop`; count opened and refused ones into `opened`."""
    sockets = []
    refused = 0
    deadline = time.monotonic() + CONNECT_SECONDS
    for _ in range(connections):
        sock = socket.socket()
        # A server that has stopped accepting leaves connect() waiting on a full backlog: such
        # a connection, or any not made within CONNECT_SECONDS in all, counts as refused.
        sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        try:
            sock.connect((host, port))
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
            sockets.append(sock)
        except OSError:
            refused += 1
            sock.close()
    opened.extend([len(sockets), refused])
    closed_by_server = 0
    while not stop.wait(1.0):
        for sock in list(sockets):
            try:
                sock.send(b"a")
            except OSError:
                closed_by_server += 1
                sockets.remove(sock)
                sock.close()
    opened.append(closed_by_server)
    for sock in sockets:
        sock.close()


def timed_requests(host: str, port: int, seconds: float) -> list[tuple[float, int]]:
    """Ordinary requests, one at a time on fresh connections: (latency s, status) each."""
    body = SAMPLE.read_bytes()
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request(
                "POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"}
            )
            status = connection.getresponse().status
            connection.close()
        except OSError:
            status = 0
        results.append((time.perf_counter() - started, status))
        time.sleep(0.05)
    return results


def measure(url: str, connections: int, seconds: float) -> dict:
    """Hold `connections` trickling connections open and time other requests meanwhile."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stop, opened = threading.Event(), []
    slow = threading.Thread(target=trickle, args=(host, int(port), connections, stop, opened))
    slow.start()
    while not opened:
        time.sleep(0.1)
    results = timed_requests(host, int(port), seconds)
    stop.set()
    slow.join()
    latencies = sorted(latency for latency, _ in results)
    return {
        "slow_connections": connections,
        "slow_opened": opened[0],
        "slow_refused": opened[1],
        "slow_closed_by_server": opened[2],
        "requests": len(results),
        "failed": sum(status != 200 for _, status in results),
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(measure(args.url, args.connections, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

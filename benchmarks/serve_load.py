"""Load test of `blip2 serve` on loopback: concurrent clients against the same requests sent one at a time.

    python benchmarks/serve_load.py --clients 64 --seconds 60            # the issue's target (mid-size, CPU)
    python benchmarks/serve_load.py --clients 16 --seconds 20 --threads 1   # a shared 2-core machine

Starts `blip2 serve` on a mid-size random checkpoint (benchmarks/caption_speed.py's `mid-opt`, written to a
temporary folder) and reports the time from start to /readyz. Then, for each phase (1 client, then
--loaded-phases phases of --clients clients, each client sending its next request as soon as the previous
one is answered, for --seconds): requests per second, errors, p50 / p95 latency, the mean batch size (from
/metrics) and the server's resident memory at the start and end of the phase. Each request captions one of
--images distinct random images (greedy, 20 new tokens by default; the image cache is off), so that no
cache hides the vision tower's work.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from caption_speed import checkpoint  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)."
    )
    parser.add_argument(
        "--loaded-phases", type=int, default=2, help="Loaded phases (memory flat across them?)."
    )
    parser.add_argument("--request-timeout", type=float, default=600, help="The server's, in seconds.")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Reuse this folder for the checkpoint.")
    args = parser.parse_args()

    path = checkpoint("mid-opt", args.checkpoint)
    bodies = [
        {"images": [image], "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
        for image in _images(args.images)
    ]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blip2",
            "serve",
            "--model",
            str(path),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--max-queue",
            "4096",
            "--request-timeout",
            str(args.request_timeout),
            "--image-cache",
            "0",
        ],
        env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads)},
    )
    try:
        _wait_ready(url, server)
        print(f"ready {time.monotonic() - started:.1f} s after start; load average {os.getloadavg()[0]:.2f}")
        for clients in (1, *[args.clients] * args.loaded_phases):
            print(_phase(url, server.pid, bodies, clients, args.seconds))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def _phase(url: str, pid: int, bodies: list[dict], clients: int, seconds: float) -> str:
    """`clients` closed-loop clients for `seconds`; one line of results."""
    before = _metrics(url)
    rss_start = _rss_mib(pid)
    latencies: list[float] = []
    errors = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            n = index
            while time.monotonic() < deadline:
                begin = time.monotonic()
                response = http.post(f"{url}/v1/caption", json=bodies[n % len(bodies)])
                with lock:
                    (latencies if response.status_code == 200 else errors).append(time.monotonic() - begin)
                n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begin
    after = _metrics(url)
    calls = after["calls"] - before["calls"]
    batched = after["batched"] - before["batched"]
    p50, p95 = (statistics.quantiles(latencies, n=20)[i] for i in (9, 18)) if len(latencies) > 1 else (0, 0)
    return (
        f"clients {clients:3d}: {len(latencies) / elapsed:6.2f} req/s, {len(errors)} errors, "
        f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, mean batch {batched / max(calls, 1):.2f}, "
        f"RSS {rss_start:.0f} -> {_rss_mib(pid):.0f} MiB, load average {os.getloadavg()[0]:.2f}"
    )


def _metrics(url: str) -> dict[str, float]:
    values = {"calls": 0.0, "batched": 0.0}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('blip2_batch_size_count{task="caption"}'):
            values["calls"] = float(line.split()[-1])
        elif line.startswith('blip2_batch_size_sum{task="caption"}'):
            values["batched"] = float(line.split()[-1])
    return values


def _images(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_ready(url: str, server: subprocess.Popen) -> None:
    while True:
        if server.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

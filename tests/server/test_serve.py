"""`blip2 serve` in a real process on a tiny checkpoint: ready after loading, a request in flight when
SIGTERM arrives still gets its answer, then the process ends (by the signal, as uvicorn re-raises it); and its usage and load errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from service_helpers import b64, free_port, metric

import blip2

SRC = str(Path(blip2.__file__).resolve().parents[1])


def _serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "blip2", "serve", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def test_sigterm_drains_the_request_in_flight_then_ends(checkpoints, direct, photos):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve("--model", str(checkpoints["opt"]), "--port", str(port), "--max-wait-ms", "1500")
    try:
        _wait_ready(url, process)
        answer = {}
        body = {"images": [b64(photos[0])], "num_beams": 2}
        request = threading.Thread(
            target=lambda: answer.update(r=httpx.post(f"{url}/v1/caption", json=body, timeout=60))
        )
        request.start()
        while metric(httpx.get(f"{url}/metrics").text, "blip2_queue_depth", model="model") < 1:
            time.sleep(0.01)  # the request waits in the batcher (max wait 1.5 s)
        process.send_signal(signal.SIGTERM)
        request.join(60)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json() == {"captions": direct[0].caption([photos[0].read_bytes()], num_beams=2)}
    # uvicorn re-raises the signal once it has shut down cleanly, so the parent sees a SIGTERM death
    assert process.returncode == -signal.SIGTERM, stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr


def test_a_checkpoint_that_does_not_load_is_one_line_and_exit_1(tmp_path):
    process = _serve("--model", str(tmp_path / "missing"), "--port", str(free_port()))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("blip2: error:")], stderr


def test_api_key_env_must_be_set(capsys):
    from blip2.cli import main

    try:
        main(["serve", "--api-key-env", "BLIP2_TEST_UNSET_KEY"])
    except SystemExit as e:
        assert e.code == 2
    assert "BLIP2_TEST_UNSET_KEY is not set" in capsys.readouterr().err


def test_import_blip2_and_its_cli_do_not_import_the_server_stack():
    code = (
        "import sys, blip2, blip2.cli; "
        "loaded = [m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic', 'torch') if m in sys.modules]; "
        "print(loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr

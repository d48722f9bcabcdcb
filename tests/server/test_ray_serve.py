"""`blip2 serve --engine ray`: the service as a Ray Serve deployment on a local Ray (2 CPUs, 2 replicas of
the tiny checkpoints); concurrent requests answered as the Python API answers them, by both replicas.
Marked `ray` (it starts a Ray cluster: about 30 s); skipped where Ray is not installed."""

from __future__ import annotations

import builtins
import functools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_helpers import b64, free_port

import blip2
from blip2.server.ray_serve import REPLICA_HEADER, plan

SRC = str(Path(blip2.__file__).resolve().parents[1])

pytestmark = pytest.mark.ray


def test_a_checkpoint_that_does_not_load_is_one_line_and_exit_1(tmp_path):
    # first in the module: its own local Ray, started before the fixture's
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("RAY_ADDRESS", None)
    args = ["serve", "--engine", "ray", "--model", str(tmp_path / "missing"), "--port", str(free_port())]
    out = subprocess.run(
        [sys.executable, "-m", "blip2", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("blip2: error:")]
    assert errors and "no such directory" in errors[0] and "missing" in errors[0], out.stderr


@pytest.fixture(scope="module")
def ray_service(checkpoints, retrieval_checkpoints):
    """The base URL of the service deployed on a fresh local Ray with two replicas; Ray shut down after."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from blip2.cli.serve_command import load_models
    from blip2.server import ray_serve
    from blip2.server.settings import Settings

    settings = Settings(port=free_port(), max_wait_ms=20)
    load = functools.partial(
        load_models, str(checkpoints["opt"]), str(retrieval_checkpoints["plain"]), "cpu", "float32", None
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # as connect() does, on 2 CPUs
    try:
        assert ray_serve.start(settings, load, replicas=2, gpus_per_replica=None) == 2
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_concurrent_requests_equal_the_api_and_reach_both_replicas(ray_service, direct, photos):
    import httpx

    options = [{"num_beams": 1 + i % 3, "max_new_tokens": 4 + i % 5} for i in range(8)]
    expected = [direct[0].caption([photos[i % 3].read_bytes()], **o) for i, o in enumerate(options)]

    def caption(i: int) -> tuple[list, str]:
        body = {"images": [b64(photos[i % 3])], **options[i]}
        got = httpx.post(f"{ray_service}/v1/caption", json=body, timeout=60)
        assert got.status_code == 200, got.text
        return got.json()["captions"], got.headers[REPLICA_HEADER]

    replicas: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):  # Serve picks replicas at random (power of two choices): a few rounds to see both
            answers = list(pool.map(caption, range(8)))
            assert [captions for captions, _ in answers] == expected
            replicas |= {replica for _, replica in answers}
            if len(replicas) == 2:
                break
    assert len(replicas) == 2


def test_matching_and_errors_behave_as_the_local_server(ray_service, direct, photos):
    import httpx

    texts = ["a cat on a couch", "coffee"]
    got = httpx.post(f"{ray_service}/v1/match", json={"images": [b64(photos[2])], "texts": texts}, timeout=60)
    assert got.json()["probabilities"] == pytest.approx(
        direct[1].match([photos[2].read_bytes()], texts), rel=1e-5, abs=1e-6
    )
    bad = httpx.post(f"{ray_service}/v1/caption", json={"images": ["bm90IGFuIGltYWdl"]}, timeout=60)
    assert bad.status_code == 422 and set(bad.json()["error"]) >= {"type", "message"}
    assert httpx.get(f"{ray_service}/readyz", timeout=60).status_code == 200


def test_streaming_passes_through_the_proxy(ray_service, direct, photos):
    import httpx
    from test_streaming import streamed

    body = {"images": [b64(photos[0])], "num_beams": 1, "max_new_tokens": 12}
    got = httpx.post(f"{ray_service}/v1/caption", json={**body, "stream": True}, timeout=60)
    pieces, done = streamed(got)
    want = direct[0].caption([photos[0].read_bytes()], num_beams=1, max_new_tokens=12)
    assert done == {"captions": want} and "".join(pieces[0]) == want[0] and len(pieces[0]) > 3
    assert REPLICA_HEADER in got.headers


@pytest.mark.parametrize(
    ("gpus", "replicas", "per_replica", "want"),
    [(0, None, None, (1, 0.0)), (4, None, None, (4, 1.0)), (4, None, 2, (2, 2)), (4, 3, None, (3, 1.0))],
)
def test_plan_gives_one_replica_per_gpu_by_default(gpus, replicas, per_replica, want):
    assert plan(gpus, replicas, per_replica) == want


def test_without_ray_the_cli_says_what_to_install(monkeypatch, capsys):
    from blip2.cli import main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--engine", "ray", "--model", "unused"])
    assert exit.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blip2: error:")]
    assert errors and "pip install 'blip2[ray]'" in errors[0]


def test_import_blip2_its_cli_and_the_ray_engine_module_do_not_import_ray():
    code = "import sys, blip2, blip2.cli, blip2.server.ray_serve; print('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_replica_options_need_the_ray_engine(capsys):
    from blip2.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--replicas", "2"])
    assert exit.value.code == 2
    assert "need --engine ray" in capsys.readouterr().err

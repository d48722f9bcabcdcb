"""`--engine ray`: a job as a Ray Data pipeline on a local Ray (2 CPUs, one model actor of the tiny OPT
checkpoint). Its rows equal the local engine's row for row, error rows included; a job begun by one
engine is finished by the other; without Ray the command says what to install and writes nothing.
Marked `ray` (one local Ray cluster for the module: about 30 s); skipped where Ray is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from job_helpers import GEN, mixed_inputs, read_rows, run

import blip2

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for the module (the engine joins a running Ray rather than starting its own)."""
    ray = pytest.importorskip("ray")
    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@pytest.fixture
def inputs(tmp_path, photos):
    return mixed_inputs(tmp_path, photos)


def caption(capsys, checkpoints, inputs, out, *options):
    return run(
        capsys, "caption", *inputs, "--out", str(out), "--model", str(checkpoints["opt"]), *GEN, *options
    )


def test_rows_equal_the_local_engine_row_by_row(local_ray, capsys, checkpoints, photos, inputs, tmp_path):
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    code, _, err = caption(capsys, checkpoints, inputs, local, "--chunk-size", "3")
    assert code == 1 and "8 done, 0 skipped (done before), 2 failed" in err
    code, stdout, err = caption(capsys, checkpoints, inputs, remote, "--chunk-size", "3", "--engine", "ray")
    assert code == 1 and stdout == "" and "8 done, 0 skipped (done before), 2 failed" in err
    assert "Traceback" not in err
    rows = read_rows(remote)
    assert rows == read_rows(local)
    assert [row["index"] for row in rows] == sorted(row["index"] for row in rows)
    errors = {row["key"].rsplit("/", 1)[-1]: row for row in rows if row["error"]}
    assert set(errors) == {"broken.jpg", "notes.txt"} and errors["broken.jpg"]["sha256"] is not None
    # and the captions are the library's (the local engine's oracle, here too)
    model = blip2.load(checkpoints["opt"])
    expected = dict(zip(map(str, photos), model.caption(photos, num_beams=2, max_new_tokens=6)))
    for row in rows:
        if row["source"] in expected:
            assert row["caption"] == expected[row["source"]]
    assert len(list(remote.glob("part-*.parquet"))) == len(list(local.glob("part-*.parquet"))) == 4  # 3+3+3+1


def test_a_job_begun_by_one_engine_is_finished_by_the_other(local_ray, capsys, checkpoints, inputs, tmp_path):
    full, out = tmp_path / "full.parquet", tmp_path / "resumed.parquet"
    assert caption(capsys, checkpoints, inputs, full, "--chunk-size", "2")[0] == 1
    shutil.copytree(full, out)
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts[2:]:  # as if the local job had been killed after its second chunk
        part.unlink()
    code, _, err = caption(capsys, checkpoints, inputs, out, "--chunk-size", "2", "--engine", "ray")
    # 10 inputs: astronaut, broken (failed before), chelsea, coffee kept; 5 images and notes.txt (failed) left
    assert code == 1 and "5 done, 4 skipped (done before), 1 failed" in err
    rows = read_rows(out)
    assert sorted(rows, key=lambda row: row["index"]) == read_rows(full)
    code, _, err = caption(capsys, checkpoints, inputs, out, "--engine", "ray")  # nothing left: nothing run
    assert code == 0 and "0 done, 10 skipped (done before), 0 failed" in err and read_rows(out) == rows


def test_an_error_of_the_task_in_an_actor_is_the_local_engine_s(
    local_ray, capsys, checkpoints, inputs, tmp_path
):
    """A captioning checkpoint cannot embed: the actor's InputError comes back whole (exit 2, one line)."""
    args = ["embed", *inputs, "--model", str(checkpoints["opt"])]
    local = run(capsys, *args, "--out", str(tmp_path / "local.parquet"))
    remote = run(capsys, *args, "--out", str(tmp_path / "ray.parquet"), "--engine", "ray")
    assert local[0] == remote[0] == 2
    assert [line for line in remote[2].splitlines() if line.startswith("blip2:")] == local[2].splitlines()
    assert "embed jobs need a retrieval checkpoint" in local[2]


def test_without_ray_the_job_says_what_to_install_and_writes_nothing(monkeypatch, capsys, tmp_path, photos):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` raises ImportError, as when not installed
    out = tmp_path / "captions.parquet"
    code, _, err = run(
        capsys, "caption", str(photos[0]), "--out", str(out), "--engine", "ray", "--model", "unused"
    )
    assert code == 1 and not out.exists()
    assert err.startswith("blip2: error: --engine ray needs Ray Data: pip install 'blip2[ray]'")


def test_the_cli_and_the_engine_module_do_not_import_ray_until_it_runs():
    code = "import sys, blip2.cli, blip2.jobs.ray_engine; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "False", out.stderr

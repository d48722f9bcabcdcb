"""`--workers N`: the decode pool of worker processes (blip2.jobs.decode). Its results equal decoding in
this process, in input order; an input whose worker dies or hangs fails alone and the pool goes on; a bug
in `prepare` is raised at its turn; the inputs are read no further ahead than `ahead`. In a job: the same
rows with any number of workers, and an input that kills its worker is an error row, not tried again."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from job_helpers import GEN, mixed_inputs, read_rows, run

from blip2.errors import Blip2Error, ImageError
from blip2.image_config import ImageProcessorConfig
from blip2.images import load_resized
from blip2.jobs.decode import DecodePool, each_decoded

CONFIG = ImageProcessorConfig()  # the defaults: 384 x 384, bicubic


class Wrapped(Blip2Error):
    """An error whose constructor takes other arguments than its message, holding another such error (as
    the runner's errors of inputs not run hold the input's ImageError)."""

    def __init__(self, digest: str, error: Blip2Error):
        super().__init__(str(error))
        self.digest = digest
        self.error = error


# What the workers run: module-level, so that the worker processes can import them by name.
def decode_or_die(path: str) -> object:
    """Decode `path`; a path naming "die" kills its worker as a crashing decoder (or the OOM killer) would."""
    if "die" in os.path.basename(path):
        os.kill(os.getpid(), signal.SIGKILL)
    if "hang" in os.path.basename(path):
        time.sleep(60)
    if "bug" in os.path.basename(path):
        raise KeyError(path)
    if "wrapped" in os.path.basename(path):
        raise Wrapped("abc", ImageError(path, "held"))
    return load_resized(path, CONFIG)


def pid(_: object) -> int:
    return os.getpid()


def as_arrays(results: list) -> list:
    return [r if isinstance(r, Blip2Error) else np.asarray(r) for r in results]


def test_results_equal_decoding_here_in_input_order(photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:300])
    paths = [str(p) for p in [*photos, broken, *photos]]
    with DecodePool(decode_or_die, workers=2, ahead=3) as pool:
        got = as_arrays(list(pool.map(paths)))
    for path, result in zip(paths, got):
        if path == str(broken):
            with pytest.raises(ImageError) as expected:
                load_resized(path, CONFIG)
            assert isinstance(result, ImageError) and str(result) == str(expected.value)
            assert result.reason == expected.value.reason and result.source == path
        else:
            assert np.array_equal(result, np.asarray(load_resized(path, CONFIG)))


def test_a_worker_that_dies_or_hangs_fails_its_input_alone(photos, tmp_path):
    die, hang = tmp_path / "die.jpg", tmp_path / "hang.jpg"
    paths = [str(p) for p in [photos[0], die, photos[1], hang, photos[2], die, photos[3]]]
    with DecodePool(decode_or_die, workers=2, timeout_s=3.0) as pool:
        got = as_arrays(list(pool.map(paths)))
    for path, result in zip(paths, got):
        if path == str(die):
            assert isinstance(result, ImageError) and result.source == path
            assert "died on this input (killed by signal 9)" in result.reason
        elif path == str(hang):
            assert isinstance(result, ImageError) and "decoding took over 3 s" in result.reason
        else:
            assert np.array_equal(result, np.asarray(load_resized(path, CONFIG)))


def test_errors_come_back_whole(tmp_path):
    with DecodePool(decode_or_die, workers=1) as pool:
        [got] = pool.map([str(tmp_path / "wrapped.jpg")])
    assert isinstance(got, Wrapped) and got.digest == "abc" and str(got) == f"{tmp_path}/wrapped.jpg: held"
    assert isinstance(got.error, ImageError) and got.error.reason == "held"


def test_a_bug_in_prepare_is_raised_at_its_turn(photos, tmp_path):
    paths = [str(photos[0]), str(photos[1]), str(tmp_path / "bug.jpg"), str(photos[2])]
    with DecodePool(decode_or_die, workers=2) as pool:
        results = pool.map(paths)
        for path in paths[:2]:
            assert np.array_equal(np.asarray(next(results)), np.asarray(load_resized(path, CONFIG)))
        with pytest.raises(KeyError, match="bug.jpg"):
            next(results)


def test_inputs_are_read_at_most_ahead_of_the_consumer():
    pulled = []

    def numbers():
        for i in range(40):
            pulled.append(i)
            yield i

    with DecodePool(pid, workers=2, ahead=5) as pool:
        results = pool.map(numbers())
        for taken in range(1, 41):
            next(results)
            time.sleep(0.02)  # the feeding thread gets every chance to run ahead
            assert len(pulled) <= taken + 5
        assert len({p for p in pool.map(range(20))}) == 2  # both workers did some


def test_closing_the_pool_ends_its_processes(photos):
    pool = DecodePool(decode_or_die, workers=2)
    processes = [worker.process for worker in pool._workers]
    results = pool.map([str(photos[0])] * 50)
    next(results)
    results.close()  # the consumer stops early
    pool.close()
    assert not any(process.is_alive() for process in processes)


def test_each_decoded_batches_as_each_input_does(photos, tmp_path):
    from blip2.tasks.batch import each_input

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [str(p) for p in [*photos, broken, *photos[:2]]]
    batches = []

    def run(good: list) -> list:
        batches.append(len(good))
        return [np.asarray(image).mean() for image in good]

    prepare = functools.partial(load_resized, config=CONFIG)
    expected = [
        (item, str(r) if isinstance(r, Blip2Error) else r) for item, r in each_input(paths, 3, prepare, run)
    ]
    expected_batches, batches[:] = list(batches), []
    with DecodePool(prepare, workers=2) as pool:
        got = [
            (item, str(r) if isinstance(r, Blip2Error) else r)
            for item, r in each_decoded(pool, paths, 3, run)
        ]
    assert got == expected and batches == expected_batches == [3, 2, 2]


def size_or_die(data: bytes) -> int:
    """A stand-in for decoding in a job: the size of the bytes; bytes ending in DIE kill their worker."""
    if data.endswith(b"DIE"):
        os.kill(os.getpid(), signal.SIGKILL)
    return len(data)


def test_in_a_job_an_input_that_kills_its_worker_is_an_error_row_done_once(tmp_path, photos):
    from blip2.jobs import Job, open_job, run_job

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    (folder / "die.jpg").write_bytes(photos[0].read_bytes() + b"DIE")  # a JPEG still, by its content
    job = Job("size", "none", {}, {"caption": "string"})
    summaries = []
    for _ in range(2):
        summaries.append(
            run_job(
                [str(folder)],
                open_job(str(tmp_path / "sizes.jsonl"), job),
                job,
                size_or_die,
                lambda sizes: [{"caption": str(size)} for size in sizes],
                batch_size=2,
                workers=2,
            )
        )
    assert [(s.done, s.failed, s.skipped) for s in summaries] == [(3, 1, 0), (0, 0, 4)]
    rows = read_rows(tmp_path / "sizes.jsonl")
    assert len(rows) == 4
    for row in rows:
        data = Path(row["source"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        if row["source"].endswith("die.jpg"):
            assert row["error"] == "the decoding process died on this input (killed by signal 9)"
        else:
            assert row["error"] is None and row["caption"] == str(len(data))


@pytest.fixture
def inputs(tmp_path, photos):
    return mixed_inputs(tmp_path, photos)


def test_the_rows_of_a_job_do_not_depend_on_its_workers(capsys, checkpoints, inputs, tmp_path):
    outputs = {}
    for workers in ["0", "2", None]:
        out = tmp_path / f"captions-{workers}.parquet"
        options = [] if workers is None else ["--workers", workers]
        args = ["caption", *inputs, "--out", str(out), "--model", str(checkpoints["opt"]), *GEN, *options]
        code, _, err = run(capsys, *args, "--chunk-size", "4")
        assert code == 1 and "8 done, 0 skipped (done before), 2 failed" in err
        outputs[workers] = read_rows(out)
    assert outputs["2"] == outputs["0"] == outputs[None]
    assert {row["error"] for row in outputs["2"]} >= {"not an image (unknown content)", None}


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--engine", "ray", "--workers", "2"], "--workers is for the local engine"),
        (["--actors", "2"], "--actors needs --engine ray"),
        (["--workers", "-1"], "-1 is not in the range x>=0"),
    ],
)
def test_options_of_the_other_engine_are_usage_errors(capsys, photos, tmp_path, options, said):
    out = tmp_path / "captions.parquet"
    code, _, err = run(capsys, "caption", str(photos[0]), "--out", str(out), "--model", "unused", *options)
    assert code == 2 and said in err and not out.exists()


@pytest.mark.parametrize(
    ("command", "options", "said"),
    [
        (["caption"], ["--workers", "2"], "--workers is a job option: it has no effect without --out"),
        (["caption"], ["--engine", "ray"], "--engine is a job option"),
        (["ask", "what?"], ["--chunk-size", "8"], "--chunk-size is a job option"),
        (["classify", "--labels", "a,b"], ["--keep", "x"], "--keep is a job option"),
        (
            ["embed", "--out", "E.npy"],
            ["--column", "c"],
            "--column is a job option: it has no effect with an",
        ),
    ],
)
def test_job_options_without_a_job_are_usage_errors(capsys, photos, command, options, said):
    # Without --out (or with the .npy writer) nothing runs as a job: the options would be silently ignored.
    name, *rest = command
    code, out, err = run(capsys, name, str(photos[0]), *rest, "--model", "unused", *options)
    assert code == 2 and said in err and not out


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """The processes below `pid` (children, their children, ...)."""
    parents = {
        int(p.name): int(f[1]) for p in Path("/proc").iterdir() if p.name.isdigit() and (f := _stat(p.name))
    }
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (fields := _stat(pid)) and fields[0] != "Z"}  # a zombie has ended


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_9_with_workers_leaves_no_process_and_resumes_exactly(checkpoints, photos, tmp_path):
    from test_runner import many_inputs

    root, photo_of = many_inputs(tmp_path, photos, "folder")
    out = tmp_path / "captions.parquet"
    command = [sys.executable, "-m", "blip2", "caption", str(root), "--out", str(out), "--workers", "2"]
    command += ["--model", str(checkpoints["opt"]), "--chunk-size", "2", "--batch-size", "1", *GEN]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(out.glob("part-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    below = descendants(process.pid)  # the fork server, its workers, multiprocessing's resource tracker
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the job finished before it was killed"
    assert len(below) >= 3
    deadline = time.monotonic() + 30
    while alive(below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(below)  # they saw their parent go, and ended
    before = read_rows(out)
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0 and f"{len(before)} skipped" in finished.stderr, finished.stderr
    rows = read_rows(out)
    assert sorted((row["source"], row["key"]) for row in rows) == sorted(photo_of)  # each input once
    assert all(row["error"] is None for row in rows) and all(row in rows for row in before)

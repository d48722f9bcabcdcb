"""The demo build's recipe: its YAMLs are valid training configs and chain the runs in the order they run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2.demo import build
from blip2.errors import InputError
from blip2.train import load_config

pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    return out, {run: load_config(build.run_config(run, out, {})) for run in build.RUNS}


def test_every_run_starts_from_what_exists_before_it(configs):
    out, runs = configs
    made = {out / "init" / "demo", out / "init" / "demo-itm"}
    for run, config in runs.items():
        for start in (config.model, config.init_from):
            assert start is None or start in made, (run, start)
        assert config.run_dir == out / "runs" / run
        made.add(config.output)
    assert {name: runs[run].output for name, run in build.EXPORTS.items()} == {
        "demo": out / "runs" / "stage2" / "output",
        "demo-itm": out / "runs" / "stage1" / "output",
    }


def test_the_warmup_runs_and_stage_1_train_the_vision_tower_and_stage_2_keeps_it(configs):
    _, runs = configs
    assert [d.name for d in runs["warmup"].data] == ["shapes.jsonl"]
    assert [d.name for d in runs["counting"].data] == ["shapes.jsonl", "counts.jsonl"]
    assert [d.name for d in runs["binding"].data] == ["shapes.jsonl", "counts.jsonl", "colors.jsonl"]
    assert [d.name for d in runs["stage1"].data] == ["captions.jsonl", "queries.jsonl"]
    assert [d.name for d in runs["stage2"].data] == ["captions.jsonl", "vqa.jsonl", "colors.jsonl"]
    assert all("vision" in runs[run].trainable for run in ("warmup", "counting", "binding", "stage1"))
    assert "vision" not in runs["stage2"].trainable  # demo keeps stage 1's tower


def test_each_warmup_run_takes_the_tower_under_fresh_heads(configs):
    """Counting and binding start from the fresh checkpoint and copy the vision tower alone from the run before:
    fresh heads learn more from the tower than the previous run's own."""
    out, runs = configs
    for before, run in (("warmup", "counting"), ("counting", "binding")):
        config = runs[run]
        assert config.model == out / "init" / "demo" and config.init_parts == ("vision",)
        assert config.init_from == runs[before].output


def test_stage_2_starts_from_stage_1s_tower_and_qformer_as_the_paper(configs):
    out, runs = configs
    assert runs["stage1"].init_from == runs["binding"].output
    assert runs["stage1"].init_parts == ("vision", "qformer")
    assert runs["stage2"].model == out / "init" / "demo"
    assert runs["stage2"].init_from == runs["stage1"].output
    assert runs["stage2"].init_parts == ("vision", "qformer")


def test_overrides_replace_fields_of_the_copied_yaml(tmp_path):
    config = load_config(build.run_config("stage1", tmp_path, {"steps": 7}))
    assert config.steps == 7 and config.stage == 1
    assert Path(tmp_path / "stage1.yaml").is_file()


def test_a_build_reruns_from_a_run_and_keeps_the_earlier_ones(tmp_path):
    """`--from stage2`: stage 2 trains again over the earlier runs' outputs, which stay as they were."""
    tiny = {"steps": 1, "batch_size": 2, "checkpoint_every": 1, "progress": False}
    overrides = {run: tiny for run in build.RUNS}
    out = tmp_path / "build"
    assert set(build.build(out, 4, overrides, install_weights=False)) == {"prepare", *build.RUNS}
    kept, rerun = (out / "runs" / run / "output" / "model.safetensors" for run in ("stage1", "stage2"))
    before = kept.stat().st_mtime_ns, rerun.stat().st_mtime_ns
    assert set(build.build(out, 4, overrides, install_weights=False, start_at="stage2")) == {"stage2"}
    assert kept.stat().st_mtime_ns == before[0]
    assert rerun.stat().st_mtime_ns != before[1]


def test_a_rerun_names_what_the_earlier_build_lacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build.main([str(tmp_path / "empty"), "--from", "stage2", "--count", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--from stage2" in err and "data" in err and str(Path("runs") / "stage1" / "output") in err


def test_runs_wait_for_the_runs_they_start_from(tmp_path):
    paths = {run: build.run_config(run, tmp_path, {}) for run in build.RUNS}
    starts = build.starts(tmp_path, paths)
    assert starts == {
        "warmup": set(),
        "counting": {"warmup"},
        "binding": {"counting"},
        "stage1": {"binding"},
        "stage2": {"stage1"},
    }
    assert build.ready(starts, {"warmup", "counting"}, {"warmup", "counting"}) == ["binding"]
    assert build.ready(starts, {"warmup", "counting"}, {"warmup", "counting", "binding"}) == []
    # runs that start from nothing of each other are ready together
    side = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    assert build.ready(side, {"a"}, {"a"}) == ["b", "c"]
    assert build.ready(side, {"a", "b"}, {"a", "b", "c"}) == []
    for jobs in (1, 2):
        with pytest.raises(InputError, match="a, b wait on each other"):
            build.train_all({"a": tmp_path, "b": tmp_path}, {"a": {"b"}, "b": {"a"}}, jobs)


def test_two_jobs_train_runs_side_by_side_with_the_same_result(tmp_path):
    """`--jobs 2`, with stage 1 started from the counting run (binding and stage 1 then start from nothing of
    each other) in two processes: every run's weights equal those of a one-job build."""
    tiny = {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "progress": False}
    overrides = {run: dict(tiny) for run in build.RUNS}
    overrides["stage1"]["init_from"] = "runs/counting/output"
    one, two = tmp_path / "one", tmp_path / "two"
    build.build(one, 4, overrides, install_weights=False)
    build.build(two, 4, overrides, install_weights=False, jobs=2)
    for run in build.RUNS:
        a = load_file(str(one / "runs" / run / "output" / "model.safetensors"))
        b = load_file(str(two / "runs" / run / "output" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


def test_the_command_line_sets_steps_and_threads_of_the_runs(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_build(out, count, overrides, install_weights, start_at, jobs):
        seen.update(out=out, count=count, overrides=overrides, install=install_weights, jobs=jobs)
        return {}

    monkeypatch.setattr(build, "build", fake_build)
    build.main([str(tmp_path), "--count", "8", "--steps1", "5", "--threads", "2", "--no-install"])
    assert seen["count"] == 8 and seen["install"] is False and seen["jobs"] == 1
    assert seen["overrides"]["stage1"] == {"steps": 5, "threads": 2}
    assert all(seen["overrides"][run] == {"threads": 2} for run in build.RUNS if run != "stage1")
    with pytest.raises(SystemExit):
        build.main([str(tmp_path), "--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_a_rebuild_keeps_the_images_and_rewrites_the_texts(tmp_path, monkeypatch):
    """Texts an older recipe drew are never trained on: a build over an earlier one (and `--from RUN`) writes
    the JSONL files again, and keeps the images (a pure function of the scene's index)."""
    data = tmp_path / "data"
    build.write_data(data, 3)
    image = data / "images" / "000001.png"
    drawn = image.stat().st_mtime_ns
    (data / "queries.jsonl").write_text('{"image": "images/000001.png", "caption": "an older recipe\'s"}\n')
    rendered = []
    monkeypatch.setattr(build.make_data.scenes, "render", lambda *a: rendered.append(a))
    build.write_data(data, 3)
    assert rendered == [] and image.stat().st_mtime_ns == drawn
    assert "an older recipe" not in (data / "queries.jsonl").read_text()
    image.unlink()  # an image missing: every image is drawn again
    monkeypatch.undo()
    build.write_data(data, 3)
    assert image.is_file()

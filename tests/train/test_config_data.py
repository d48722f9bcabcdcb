"""The training config (errors name the field, before anything loads), the CLI, and hostile training data
(bad rows and images are reported, skipped and counted; nothing outside the data's folder is read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import config

import blip2
from blip2.cli import main
from blip2.train import TrainConfigError, load_config, train
from blip2.train.data import random_resized_crop, read_rows

SRC = Path(blip2.__file__).parents[1]
REQUIRED = {"stage": 1, "model": "m", "data": "d", "run_dir": "r"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stage": 3}, "stage"),
        ({"model": None}, "model"),
        ({"lr": "fast"}, "lr"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 1}, "batch_size"),  # stage 1 needs in-batch negatives
        ({"trainable": ["vision", "everything"]}, "trainable"),
        ({"trainable": []}, "trainable"),
        ({"augment": "heavy"}, "augment"),
        ({"precision": "fp8"}, "precision"),
        ({"betas": [0.9]}, "betas"),
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"cache_vision": True, "trainable": ["vision"]}, "cache_vision"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"init_from": "x", "init_parts": ["language_model"]}, "init_parts"),
        ({"init_from": "x", "init_parts": []}, "init_parts"),
        ({"init_parts": ["vision"]}, "init_parts"),  # nothing to copy from
    ],
)
def test_a_bad_field_is_named(change, field):
    with pytest.raises(TrainConfigError, match=f"training config: {field}: "):
        load_config({**REQUIRED, **change})


def test_defaults_follow_the_paper_and_paths_the_yaml_folder(tmp_path):
    file = tmp_path / "sub" / "stage2.yaml"
    file.parent.mkdir()
    file.write_text(yaml.safe_dump({**REQUIRED, "stage": 2, "data": ["a.jsonl", "/abs/b"]}))
    cfg = load_config(file)
    assert cfg.trainable == ("qformer", "projections") and cfg.init_parts == ("vision", "qformer")
    assert cfg.augment == "none" and cfg.lr == 1e-4 and cfg.weight_decay == 0.05
    assert cfg.model == file.parent / "m" and cfg.data == (file.parent / "a.jsonl", Path("/abs/b"))
    assert cfg.output == file.parent / "r" / "output"


def test_yaml_errors_name_the_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("stage: [1\n")
    with pytest.raises(TrainConfigError, match="bad.yaml: not valid YAML"):
        load_config(file)
    file.write_text("- a list\n")
    with pytest.raises(TrainConfigError, match="must be a mapping"):
        load_config(file)
    file.write_text("!!python/object/apply:os.system ['echo hacked']\n")  # safe_load: no code runs
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_config(file)


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "blip2", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_bad_config_exits_2_naming_the_field(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({**REQUIRED, "weight_decay": -1}))
    done = run_cli(str(file))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"blip2: error: {file}: training config: weight_decay: must be in [0.0, 10.0], got -1"
    ]


def test_cli_trains_and_resumes(retrieval_checkpoints, caption_folder, tmp_path, capsys):
    file = tmp_path / "c.yaml"
    file.write_text(
        yaml.safe_dump(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "run", 1))
    )
    done = run_cli(str(file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"trained checkpoint: {tmp_path / 'run' / 'output'}"
    with pytest.raises(SystemExit) as again:
        main(["train", str(file)])
    assert again.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as resumed:
        main(["train", str(file), "--resume"])  # all steps done: exports again
    assert resumed.value.code in (0, None)


@pytest.fixture
def hostile(tmp_path, caption_folder):
    """A data folder with good and bad rows, and a file outside it."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"good{i}.png").write_bytes((caption_folder / f"image{i}.png").read_bytes())
        (data / f"good{i}.txt").write_text(f"caption number {i}\n")
    (data / "nocaption.png").write_bytes((caption_folder / "image0.png").read_bytes())
    (data / "empty.png").write_bytes((caption_folder / "image0.png").read_bytes())
    (data / "empty.txt").write_text("\n\n")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "corrupt.txt").write_text("a corrupt image")
    outside = tmp_path / "secret.png"
    outside.write_bytes((caption_folder / "image1.png").read_bytes())
    (data / "link.png").symlink_to(outside)
    (data / "link.txt").write_text("a link out of the folder")
    rows = [
        {"image": "good0.png", "caption": "fine"},
        {"image": "../secret.png", "caption": "escapes"},
        {"image": str(outside), "caption": "absolute"},
        {"image": "good1.png"},
        {"image": "good1.png", "caption": 5},
        {"image": "good1.png", "question": "what?", "answer": "this"},
        ["not", "an", "object"],
        {"image": "good2.png", "caption": "x" * 20_000},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "\xff\xfe"]
    (data / "rows.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"image": "' + b"a" * (2 << 20) + b'"}\n'
    )
    return data


def test_hostile_rows_are_reported_and_skipped(hostile, capsys):
    rows = read_rows([hostile, hostile / "rows.jsonl"], stage=1)
    images = sorted(r.image.name for r in rows.rows)
    # the folder: 4 good images (+ corrupt.png, whose decoding fails later); the JSONL: one good row
    assert images == ["corrupt.png", "good0.png", "good0.png", "good1.png", "good2.png", "good3.png"]
    reported = capsys.readouterr().err
    for problem in (
        "no caption file",
        "no caption",
        "outside",
        "needs a caption",
        "not an object",
        "not valid JSON",
        "longer than",
    ):
        assert problem in reported, problem
    assert rows.skipped == 3 + 10  # the folder: 3; the JSONL: all its rows but one
    assert "secret" not in " ".join(str(r.image) for r in rows.rows)


def test_stage2_reads_question_answer_rows(hostile):
    rows = read_rows([hostile / "rows.jsonl"], stage=2)
    assert [(r.question, r.answer) for r in rows.rows if r.question] == [("what?", "this")]


def test_a_run_over_hostile_data_counts_what_it_skipped(hostile, retrieval_checkpoints, tmp_path):
    for trainable in (["qformer"], ["vision", "qformer"]):  # the vision cache, and images decoded per batch
        run_dir = tmp_path / "-".join(trainable)
        train(config(retrieval_checkpoints["plain"], [hostile], run_dir, 1, trainable=trainable, steps=4))
        log = (run_dir / "losses.csv").read_text().splitlines()
        header, last = log[0].split(","), log[-1].split(",")
        assert int(float(last[header.index("skipped")])) >= 4  # 3 rows while reading, the corrupt image


def test_no_usable_rows_is_an_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"image": "../x.png", "caption": "out"}\n')
    with pytest.raises(blip2.errors.InputError, match="no usable rows"):
        read_rows([tmp_path / "rows.jsonl"], stage=1)
    with pytest.raises(blip2.errors.InputError, match="missing.jsonl: cannot read"):
        read_rows([tmp_path / "missing.jsonl"], stage=1)


def test_parquet_rows(tmp_path, caption_folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.png").write_bytes((caption_folder / "image0.png").read_bytes())
    pq.write_table(
        pa.table({"image": ["a.png", "../b.png"], "caption": ["a cat", "out"]}), tmp_path / "d.parquet"
    )
    rows = read_rows([tmp_path / "d.parquet"], stage=1)
    assert [(r.image.name, r.caption) for r in rows.rows] == [("a.png", "a cat")] and rows.skipped == 1


def test_random_resized_crop_keeps_half_to_all_of_the_area():
    image = Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        crop = random_resized_crop(image, gen)
        area = crop.width * crop.height / (60 * 80)
        assert 0.45 <= area <= 1.0 and crop.width <= 80 and crop.height <= 60
    a = random_resized_crop(image, torch.Generator().manual_seed(5)).size
    assert a == random_resized_crop(image, torch.Generator().manual_seed(5)).size

"""The training loop end to end on the tiny checkpoints: exports that blip2.load and transformers read, frozen
parts that stay frozen, seeded determinism, and a resume after kill -9 that ends bitwise where an uninterrupted
run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import config

import blip2
from blip2.loading.loader import load_checkpoint
from blip2.train import train
from blip2.train.config import load_config
from blip2.train.data import Position, stream
from blip2.train.loop import learning_rate, prepare, train_step

SRC = Path(blip2.__file__).parents[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_stage1_export_reads_in_blip2_and_transformers(retrieval_checkpoints, caption_folder, tmp_path):
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    out = train(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "run", 1))
    assert out == tmp_path / "run" / "output"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    image = caption_folder / "image0.png"
    ours = blip2.load(str(out), device="cpu").match(str(image), "a photo of a cat")
    reference = Blip2ForImageTextRetrieval.from_pretrained(out, dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(out)
    from PIL import Image

    inputs = processor(images=Image.open(image).convert("RGB"), text="a photo of a cat", return_tensors="pt")
    with torch.no_grad():
        logits = reference(**inputs, use_image_text_matching_head=True).logits_per_image
    assert ours == pytest.approx(float(logits.softmax(dim=1)[0, 1]), abs=1e-5)
    # the trained weights differ from the start, and the frozen vision tower does not
    before, after = weights(retrieval_checkpoints["plain"]), weights(out)
    assert not torch.equal(before["qformer.layernorm.weight"], after["qformer.layernorm.weight"])
    assert not torch.equal(before["itm_head.weight"], after["itm_head.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_stage2_export_reads_in_blip2_and_transformers(
    checkpoints, oracle, caption_folder, vqa_file, tmp_path, name
):
    from transformers import Blip2ForConditionalGeneration

    cfg = config(checkpoints[name], [caption_folder, vqa_file], tmp_path / "run", 2)
    out = train(cfg)
    ours = load_checkpoint(out, device="cpu")
    reference = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    _, processor = oracle(checkpoints[name])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.get_image_features(pixels, return_dict=True).pooler_output
        got = ours.model.image_prefix(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    before, after = weights(checkpoints[name]), weights(out)
    assert not torch.equal(before["language_projection.weight"], after["language_projection.weight"])
    assert all(
        torch.equal(before[k], after[k]) for k in after if k.startswith(("language_model.", "vision_model."))
    )


def test_frozen_parts_get_no_gradients_and_no_optimizer_state(
    retrieval_checkpoints, caption_folder, tmp_path
):
    cfg = load_config(
        config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "run", 1, trainable=["qformer"])
    )
    run, progress = prepare(cfg, resume=False)
    values = train_step(run, stream(run.rows.rows, cfg.seed, Position()), progress, set())
    assert values["loss"] > 0
    for name, p in run.objective.named_parameters():
        trains = name.startswith(("model.qformer.", "model.query_tokens", "model.embeddings.", "itg_head."))
        assert p.requires_grad == trains, name
        assert p.grad is None  # zeroed to None after the step; frozen ones never had one
        assert (p in run.optimizer.state) == trains, name
    assert not run.objective.temp.requires_grad


def test_gradients_reach_only_the_trainable_parts(retrieval_checkpoints, caption_folder, tmp_path):
    cfg = load_config(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "run", 1))
    run, progress = prepare(cfg, resume=False)
    rows = run.rows.rows[:3]
    embeds = torch.stack([run.cache[r.image] for r in rows])
    out = run.objective(embeds, run.make_text(rows), torch.Generator().manual_seed(0))
    out["loss"].backward()
    for name, p in run.objective.named_parameters():
        if name.startswith("model.vision_model."):
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None, name
    assert run.objective.temp.grad is not None and bool(run.objective.temp.grad != 0)


def test_training_is_deterministic_on_cpu(retrieval_checkpoints, caption_folder, tmp_path):
    cfg = dict(trainable=["vision", "qformer", "projections"], augment="lavis")
    a = train(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "a", 1, **cfg))
    b = train(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "b", 1, **cfg))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_checkpointing_gives_the_same_training(checkpoints, caption_folder, tmp_path):
    cfg = dict(trainable=["vision", "qformer", "projections", "language_model"])
    a = train(config(checkpoints["opt"], caption_folder, tmp_path / "a", 2, **cfg))
    b = train(
        config(checkpoints["opt"], caption_folder, tmp_path / "b", 2, gradient_checkpointing=True, **cfg)
    )
    wa, wb = weights(a), weights(b)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        wa["language_model.model.decoder.layers.0.fc1.weight"],
        weights(checkpoints["opt"])["language_model.model.decoder.layers.0.fc1.weight"],
    )


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from blip2.train import loop, state

    real_save = state.save

    def save(root, progress, *args, **kwargs):
        if progress.step == 4:  # die while writing the second checkpoint: a half-written .tmp folder stays
            tmp = state.step_folder(root, progress.step).with_name("step-00000004.tmp")
            tmp.mkdir(parents=True)
            (tmp / "state.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(root, progress, *args, **kwargs)

    state.save = save
    loop.train(sys.argv[1])
    """
)


def test_resume_after_kill_gives_the_same_weights(retrieval_checkpoints, caption_folder, tmp_path):
    import yaml

    settings = dict(steps=6, trainable=["vision", "qformer", "projections"], augment="lavis", grad_accum=2)
    whole = train(config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "whole", 1, **settings))

    run_dir = tmp_path / "killed"
    file = tmp_path / "killed.yaml"
    file.write_text(
        yaml.safe_dump(config(retrieval_checkpoints["plain"], caption_folder, run_dir, 1, **settings))
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(file)], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert (run_dir / "checkpoints" / "step-00000002").is_dir()
    assert not (run_dir / "output").exists()

    resumed = train(file, resume=True)
    wa, wb = weights(whole), weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    losses_whole = [r.split(",")[:-1] for r in (tmp_path / "whole" / "losses.csv").read_text().splitlines()]
    losses_resumed = [r.split(",")[:-1] for r in (run_dir / "losses.csv").read_text().splitlines()]
    assert losses_whole == losses_resumed  # every column but the seconds


def test_a_run_dir_with_checkpoints_needs_resume(retrieval_checkpoints, caption_folder, tmp_path):
    cfg = config(retrieval_checkpoints["plain"], caption_folder, tmp_path / "run", 1, steps=2)
    train(cfg)
    with pytest.raises(blip2.errors.InputError, match="run_dir: .*--resume"):
        train(cfg)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    cfg = load_config(
        {
            "stage": 2,
            "model": "m",
            "data": "d",
            "run_dir": "r",
            "steps": 11,
            "warmup_steps": 2,
            "lr": 1e-3,
            "min_lr": 1e-5,
            "warmup_lr": 1e-6,
        }
    )
    assert learning_rate(0, cfg) == pytest.approx(1e-6)
    assert learning_rate(1, cfg) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert learning_rate(2, cfg) == pytest.approx(1e-3)
    import math

    assert learning_rate(6, cfg) == pytest.approx(
        1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    )
    assert learning_rate(10, cfg) == pytest.approx(1e-5)

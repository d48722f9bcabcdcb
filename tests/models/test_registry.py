"""The language-model registry: every entry builds a working model, and nothing outside models/ asks which
family it holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from blip2.config import TEXT_CONFIGS
from blip2.models.layers import decoder_inputs
from blip2.models.registry import FAMILIES, family
from blip2.testing import TINY_OPT, TINY_T5

# A tiny config per family (as timm registers tiny variants for CI); a new family needs one here.
TINY = {
    "opt": TINY_OPT,
    "t5": TINY_T5,
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}
VOCAB = 64


@pytest.mark.parametrize("entry", FAMILIES, ids=lambda f: f.name)
def test_entry_builds_a_model_that_runs(entry):
    config = entry.config_class(**TINY[entry.name], vocab_size=VOCAB)
    assert family(config) is entry
    torch.manual_seed(0)
    lm = entry.model_class(config).eval()
    ids = torch.randint(4, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    embeds = lm.embed(ids)
    assert embeds.shape == (2, 5, entry.width(config))
    if entry.is_encoder_decoder:
        bias = lm.decoder_self_bias(1)
        logits = lm.decode(ids[:, :1], lm.encode(embeds, mask), bias, lm.decoder_cross_bias(mask, bias.dtype))
        assert entry.padding_side == "right"
    else:
        logits = lm(embeds, *decoder_inputs(mask))
        assert entry.padding_side == "left"
    assert logits.shape[::2] == (2, VOCAB) and torch.isfinite(logits).all()
    assert entry.decoder_layers(config) == 2
    assert entry.ask_template is None or entry.ask_template.count("{}") == 1


def test_config_parsing_and_registry_name_the_same_families():
    assert {f.name: f.config_class for f in FAMILIES} == TEXT_CONFIGS


def test_dtype_policy():
    t5, opt = family(TEXT_CONFIGS["t5"]()), family(TEXT_CONFIGS["opt"]())
    assert t5.weights_dtype(torch.float16) == torch.bfloat16  # Flan-T5 overflows in float16
    assert t5.weights_dtype(torch.float32) == torch.float32
    assert opt.weights_dtype(torch.float16) == torch.float16


def test_no_family_checks_outside_models():
    src = Path(__file__).resolve().parents[2] / "src" / "blip2"
    names = "|".join(cls.__name__ for cls in TEXT_CONFIGS.values())
    check = re.compile(rf"isinstance\([^)]*\b({names})\b")
    offenders = [
        f"{path.relative_to(src)}:{i}"
        for path in src.rglob("*.py")
        if "models" not in path.relative_to(src).parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if check.search(line)
    ]
    assert offenders == []

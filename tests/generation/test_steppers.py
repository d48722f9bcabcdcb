"""The static decode path of our steppers: a step equals the full-sequence forward, writes at input_pos into
buffers that keep their address (what a recorded CUDA graph needs), and beam reordering moves cache rows.

Parity with transformers' generate is in tests/tasks (every caption and answer runs these steppers)."""

from __future__ import annotations

import pytest
import torch

from blip2.generation.steppers import DecoderOnlyStepper, EncoderDecoderStepper
from blip2.models.layers import decoder_inputs
from blip2.models.registry import FAMILIES
from blip2.testing import TINY_OPT, TINY_T5

TINY = {
    "opt": TINY_OPT,
    "t5": TINY_T5,
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}
VOCAB = 64
PROMPT, NEW = 5, 4
DECODER_ONLY = [f for f in FAMILIES if not f.is_encoder_decoder]
ENCODER_DECODER = [f for f in FAMILIES if f.is_encoder_decoder]


def tiny_lm(entry, device="cpu"):
    config = entry.config_class(**TINY[entry.name], vocab_size=VOCAB)
    torch.manual_seed(0)
    return entry.model_class(config).eval().to(device), config


def left_padded(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])


def decoder_only_stepper(entry, device="cpu", cuda_graphs=False):
    lm, config = tiny_lm(entry, device)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, PROMPT, entry.width(config), generator=g).to(device)
    mask = left_padded([5, 3, 1], PROMPT).to(device)
    stepper = DecoderOnlyStepper(lm, embeds, mask, entry.decoder_layers(config), cuda_graphs=cuda_graphs)
    return lm, embeds, mask, stepper


def tokens(step: int, device="cpu") -> torch.Tensor:
    return (torch.arange(3, device=device) * 7 + step * 11) % VOCAB


@pytest.mark.parametrize("entry", DECODER_ONLY, ids=lambda f: f.name)
@torch.no_grad()
def test_decoder_only_steps_equal_the_full_forward(entry):
    lm, embeds, mask, stepper = decoder_only_stepper(entry)
    got = [stepper.prefill(NEW)]
    fed = [tokens(i) for i in range(NEW - 1)]
    got += [stepper.step(t) for t in fed]
    whole = torch.cat([embeds, lm.embed(torch.stack(fed, dim=1))], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, NEW - 1, dtype=mask.dtype)], dim=1)
    full = lm(whole, *decoder_inputs(full_mask)).float()  # (N, PROMPT + NEW - 1, V)
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, PROMPT - 1 + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry", ENCODER_DECODER, ids=lambda f: f.name)
@torch.no_grad()
def test_encoder_decoder_steps_equal_the_full_decode(entry):
    lm, config = tiny_lm(entry)
    embeds = torch.randn(3, PROMPT, entry.width(config), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * n + [0] * (PROMPT - n) for n in (5, 3, 1)])  # right-padded, as T5's
    start = config.decoder_start_token_id
    stepper = EncoderDecoderStepper(lm, embeds, mask, start, entry.decoder_layers(config))
    got = [stepper.prefill(NEW)]
    fed = [tokens(i) for i in range(NEW - 1)]
    got += [stepper.step(t) for t in fed]
    ids = torch.cat([torch.full((3, 1), start), torch.stack(fed, dim=1)], dim=1)
    bias = lm.decoder_self_bias(ids.shape[1])
    full = lm.decode(ids, lm.encode(embeds, mask), bias, lm.decoder_cross_bias(mask, bias.dtype)).float()
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=0)


def _addresses(stepper) -> list[int]:
    tensors = [*stepper.cache.keys, *stepper.cache.values, stepper.positions, stepper.mask]
    return [t.data_ptr() for t in tensors]


@pytest.mark.parametrize("entry", DECODER_ONLY, ids=lambda f: f.name)
@torch.no_grad()
def test_steps_and_reorders_keep_buffer_addresses(entry):
    """What a recorded step reads and writes stays put: steps write in place, a same-size reorder copies
    in place; only a change of row count (expanding for beams, before any step) reallocates."""
    _, _, _, stepper = decoder_only_stepper(entry)
    stepper.prefill(NEW)
    before = _addresses(stepper)
    assert stepper.cache.keys[0].shape[2] == PROMPT + NEW  # preallocated for the whole decode
    stepper.step(tokens(0))
    keys = stepper.cache.keys[0].clone()
    stepper.select(torch.tensor([2, 0, 1]))
    assert torch.equal(stepper.cache.keys[0], keys[[2, 0, 1]])  # the rows moved, on the device
    stepper.step(tokens(1))
    assert _addresses(stepper) == before
    assert int(stepper.input_pos) == PROMPT + 2
    stepper.select(torch.tensor([0, 0, 1, 1, 2, 2]))
    assert stepper.cache.keys[0].shape[0] == 6 and stepper.positions.shape[0] == 6


@torch.no_grad()
def test_cuda_graphs_switch_needs_cuda():
    _, _, _, stepper = decoder_only_stepper(DECODER_ONLY[0], cuda_graphs=True)
    stepper.prefill(NEW)
    with pytest.raises(ValueError, match="CUDA"):
        stepper.step(tokens(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (not run on CPU CI)")
@pytest.mark.parametrize("entry", DECODER_ONLY, ids=lambda f: f.name)
@torch.no_grad()
def test_cuda_graph_replays_equal_the_eager_steps(entry):
    """The recorded step is the eager one: same logits through steps and a beam reorder, and no host sync
    in a reorder or a step once recorded (torch raises on one in sync debug mode "error")."""
    runs = []
    for graphs in (False, True):
        _, _, _, stepper = decoder_only_stepper(entry, "cuda", cuda_graphs=graphs)
        out = [stepper.prefill(NEW), stepper.step(tokens(0, "cuda"))]  # the first step records the graph
        reorder = torch.tensor([2, 0, 1], device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            stepper.select(reorder)
            out += [stepper.step(tokens(1, "cuda")), stepper.step(tokens(2, "cuda"))]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append(torch.stack(out))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)

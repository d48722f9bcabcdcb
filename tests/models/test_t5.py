"""blip2.models.t5 against transformers' T5ForConditionalGeneration on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, EncoderDecoderCache, StaticCache  # noqa: E402

from blip2.config import T5Config  # noqa: E402
from blip2.models.cache import KVCache  # noqa: E402
from blip2.models.t5 import T5ForConditionalGeneration, relative_position_bucket  # noqa: E402

TINY = dict(
    vocab_size=120,
    d_model=48,
    d_kv=12,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
S = 24  # encoder length, past max_distance so the far (clamped) buckets are used
DECODER_IDS = torch.tensor([[0, 5, 17, 99, 3, 42, 8], [0, 61, 2, 7, 110, 30, 12]])  # start token + 6


def make_pair(dtype=torch.float32, std=0.4, **overrides):
    """A widened random transformers T5 and ours with its weights loaded strictly."""
    kwargs = {**TINY, **overrides}
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    if not kwargs["tie_word_embeddings"]:
        # transformers 5 always ties lm_head to shared (tie_word_embeddings only picks the scaling): untie
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" not in name:  # its init is near-uniform: widen so logits are not near-ties
                p.normal_(0.0, std)
            else:
                p.uniform_(0.5, 1.5)
    hf = hf.to(dtype)
    ours = T5ForConditionalGeneration(T5Config(**kwargs)).to(dtype).eval()
    ours.load_state_dict(drop_aliases(hf.state_dict(), ours), strict=True)
    return hf, ours


def drop_aliases(state: dict, model) -> dict:
    return {k: v for k, v in state.items() if k not in model.key_aliases}


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, S, TINY["d_model"], generator=g).to(dtype)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 17:] = 0  # right padding in row 1
    return embeds, mask


def hf_logits(hf, embeds, mask, decoder_ids=DECODER_IDS):
    return hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_relative_position_bucket_matches_reference():
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-40, 41)[None, :] - torch.arange(0, 5)[:, None]
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional, num_buckets=8, max_distance=16)
        theirs = ref(rel, bidirectional=bidirectional, num_buckets=8, max_distance=16)
        assert torch.equal(ours, theirs)
    assert relative_position_bucket(rel, True, 8, 16).max() == 7  # far buckets reached


@torch.no_grad()
def test_encoder_matches_with_padding():
    hf, ours = make_pair()
    embeds, mask = inputs()
    ref = hf.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    out = ours.encode(embeds, mask)
    assert out.shape == (2, S, TINY["d_model"])
    keep = mask.bool()
    assert max_diff(out[keep], ref[keep]) < 1e-5


def hf_incremental_logits(hf, embeds, mask, decoder_ids=DECODER_IDS):
    """transformers' own cached decoding, one token at a time, with its static cache -> (B, T, V).

    Its static cache, as ours is: every step attends over the whole buffer, unwritten positions masked.
    On these widened float32 models that alone moves the logits by up to ~2.3e-5 from transformers' own
    growing (dynamic) cache, a float32 rounding difference of the attention kernels over 7 keys instead of
    t + 1; ours equals its static cache bit for bit, and the float64 test below rules out a masking slip.
    """
    encoder_outputs = hf.encoder(inputs_embeds=embeds, attention_mask=mask)
    length = decoder_ids.shape[1]
    cache = EncoderDecoderCache(StaticCache(config=hf.config, max_cache_len=length), DynamicCache())
    steps = []
    for t in range(length):
        out = hf(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=decoder_ids[:, t : t + 1],
            cache=cache,
            cache_position=torch.tensor([t]),
            use_cache=True,
        )
        cache = out.cache
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def decode_full(ours, decoder_ids, enc, mask, last_only=False):
    """Our decoder over the whole sequence of decoder ids at once, without a cache -> (B, T, V)."""
    bias = ours.decoder_self_bias(decoder_ids.shape[1])
    cross = ours.decoder_cross_bias(mask, bias.dtype)
    return ours.decode(decoder_ids, enc, bias, cross, last_only=last_only)


def our_incremental_logits(ours, embeds, mask, decoder_ids=DECODER_IDS):
    """Our static-cache decoding, one token at a time, as the stepper runs it -> (B, T, V)."""
    enc = ours.encode(embeds, mask)
    length = decoder_ids.shape[1]
    bias, cross = ours.decoder_self_bias(length), ours.decoder_cross_bias(mask, enc.dtype)
    cache, steps = KVCache(len(ours.decoder.block), length), []
    for t in range(length):
        pos = torch.tensor([t])
        # the encoder output is needed once only: the cross-attention K/V are cached at the first step
        out = ours.decode(
            decoder_ids[:, pos], enc if t == 0 else None, bias[:, :, pos], cross, cache, pos, True
        )
        steps.append(out)  # (B, 1, V)
        assert cache.keys[0][:, :, t].any() and not cache.keys[0][:, :, t + 1 :].any()  # written at t only
    return torch.cat(steps, dim=1)


# The released Flan-T5 configs: gated, with exact GELU written as dense_act_fn (RELEASED); TINY alone is the
# plain "gated-gelu", which means the tanh approximation (gelu_new).
RELEASED = {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}
VARIANTS = pytest.mark.parametrize(
    "overrides",
    [
        {},
        RELEASED,
        {"num_layers": 3, "num_decoder_layers": 2},
        {"feed_forward_proj": "relu"},
        {"tie_word_embeddings": True},
    ],
    ids=["gated-gelu_new", "released-gated-exact-gelu", "enc3-dec2", "relu", "tied"],
)


@VARIANTS
@torch.no_grad()
def test_decoding_matches_reference(overrides):
    hf, ours = make_pair(**overrides)
    embeds, mask = inputs()
    ref = hf_logits(hf, embeds, mask)  # (B, 7, V)
    assert ref.std() > 0.3  # logits are spread, not near-ties (the tied head scales them by d_model**-0.5)

    enc = ours.encode(embeds, mask)
    full = decode_full(ours, DECODER_IDS, enc, mask)
    assert full.shape == ref.shape
    assert max_diff(full, ref) < 1e-5
    assert max_diff(decode_full(ours, DECODER_IDS, enc, mask, last_only=True), ref[:, -1:]) < 1e-5
    # cached decoding: one query row takes other float32 kernels than seven, in both implementations alike
    assert (
        max_diff(our_incremental_logits(ours, embeds, mask), hf_incremental_logits(hf, embeds, mask)) < 1e-5
    )


@VARIANTS
@torch.no_grad()
def test_incremental_equals_full_sequence(overrides):
    """In float64, so that kernel rounding (~1e-5 relative in float32 here) cannot hide a masking slip."""
    hf, ours = make_pair(torch.float64, **overrides)
    embeds, mask = inputs(torch.float64)
    ref = hf_logits(hf, embeds, mask)
    assert max_diff(our_incremental_logits(ours, embeds, mask), ref) < 1e-10
    assert max_diff(decode_full(ours, DECODER_IDS, ours.encode(embeds, mask), mask), ref) < 1e-10


@torch.no_grad()
def test_dense_act_fn_decides_the_activation():
    """The released configs' dense_act_fn 'gelu' is honoured: the same weights run with the activation that
    feed_forward_proj alone implies (gelu_new) give other logits, so the parity above would catch its loss."""
    hf, ours = make_pair(**RELEASED)
    assert hf.config.dense_act_fn == ours.config.dense_act_fn == "gelu"
    implied = T5ForConditionalGeneration(T5Config(**TINY)).eval()
    assert implied.config.dense_act_fn == "gelu_new"
    implied.load_state_dict(ours.state_dict())
    embeds, mask = inputs()
    ref = hf_logits(hf, embeds, mask)
    assert max_diff(decode_full(ours, DECODER_IDS, ours.encode(embeds, mask), mask), ref) < 1e-5
    assert max_diff(decode_full(implied, DECODER_IDS, implied.encode(embeds, mask), mask), ref) > 1e-3


def test_meta_build_and_assign_load():
    hf, _ = make_pair(tie_word_embeddings=True)
    config = T5Config(**{**TINY, "tie_word_embeddings": True})
    with torch.device("meta"):
        ours = T5ForConditionalGeneration(config)
    assert ours.tied_weights == {"lm_head.weight": "shared.weight"}
    state = drop_aliases(hf.state_dict(), ours)
    ours.load_state_dict(state, strict=True, assign=True)
    ours.tie_weights()
    assert ours.lm_head.weight is ours.shared.weight
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    embeds, mask = inputs()
    with torch.no_grad():
        out = decode_full(ours, DECODER_IDS, ours.encode(embeds, mask), mask)
        assert max_diff(out, hf_logits(hf, embeds, mask)) < 1e-5


def test_untied_model_has_no_tied_weights():
    ours = T5ForConditionalGeneration(T5Config(**TINY))
    assert ours.tied_weights == {}
    assert ours.lm_head.weight is not ours.shared.weight
    assert set(ours.state_dict()) == set(drop_aliases(make_pair()[0].state_dict(), ours))


@pytest.mark.parametrize("wo_float32", [False, True], ids=["all-bf16", "wo-fp32"])
@torch.no_grad()
def test_bfloat16_matches_reference(wo_float32):
    """bfloat16, also with wo kept in float32 as transformers' _keep_in_fp32_modules does for T5.

    Same ops in the same order, so the logits agree bit for bit today; the bound allowed is one bfloat16
    ulp at the logit scale (2**-7 relative). For scale: these widened models in bfloat16 are ~6 away from
    their own float32 logits, so the bound still catches any real divergence.
    """
    hf, ours = make_pair(torch.bfloat16)
    if wo_float32:
        for model in (hf, ours):
            for name, module in model.named_modules():
                if name.endswith(".wo"):
                    module.float()
    embeds, mask = inputs(torch.bfloat16)
    ref = hf_logits(hf, embeds, mask)
    out = decode_full(ours, DECODER_IDS, ours.encode(embeds, mask), mask)
    assert out.dtype == ref.dtype
    tol = ref.float().abs().max().item() * 2**-7
    assert max_diff(out, ref) <= tol
    assert (
        max_diff(our_incremental_logits(ours, embeds, mask), hf_incremental_logits(hf, embeds, mask)) <= tol
    )


@pytest.mark.parametrize("std", [8.0, 32.0])
@torch.no_grad()
def test_float16_overflow_as_reference(std):
    """float16 on over-widened weights. std 8: the sub-layers overflow to inf inside, the clamp after each
    sub-layer saves the residual stream and the logits are finite. std 32: inf - inf gives NaN, which no clamp
    removes; encoder and logits are NaN. Either way ours has the same NaN pattern and values as transformers.
    """
    hf, ours = make_pair(torch.float16, std=std)
    embeds, mask = inputs(torch.float16)
    overflowed = []
    for module in ours.modules():
        if type(module).__name__ == "T5LayerFF":
            module.register_forward_hook(lambda m, i, out: overflowed.append(bool(out.isinf().any())))
    ref_enc = hf.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    enc = ours.encode(embeds, mask)
    ref = hf_logits(hf, embeds, mask)
    out = decode_full(ours, DECODER_IDS, enc, mask)
    print(f"std {std}: sub-layer overflow {any(overflowed)}, NaN logits {out.isnan().float().mean():.0%}")
    assert any(overflowed)
    assert torch.equal(enc.isnan(), ref_enc.isnan()) and torch.equal(out.isnan(), ref.isnan())
    assert not out.isinf().any()
    assert out.isnan().any() == (std == 32.0)
    finite = out.isfinite()
    if finite.any():
        assert max_diff(out[finite], ref[finite]) <= ref[finite].float().abs().max().item() * 2**-10

"""OPT language model against the reference (transformers' OPTForCausalLM) on tiny random checkpoints."""

import pytest
import torch
import transformers

from blip2.config import OPTConfig
from blip2.models.cache import KVCache
from blip2.models.layers import decoder_inputs
from blip2.models.opt import OPTForCausalLM

VOCAB = 120
TOL = 1e-5

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=48,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=1,
)

VARIANTS = {
    "pre_ln": {},
    "post_ln": dict(do_layer_norm_before=False),
    "proj_dim": dict(word_embed_proj_dim=24),
    "untied": dict(tie_word_embeddings=False),
    "no_final_ln_gelu": dict(_remove_final_layer_norm=True, activation_function="gelu"),
    "no_bias_no_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
}


def reference(attn: str = "sdpa", **overrides) -> transformers.OPTForCausalLM:
    """A tiny reference model with weights widened away from its near-uniform init (no near-ties)."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(**{**TINY, **overrides}, attn_implementation=attn)
    model = transformers.OPTForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "layer_norm.weight" in name else 0.3 * noise)
    return model


def ours(ref: transformers.OPTForCausalLM) -> OPTForCausalLM:
    model = OPTForCausalLM(OPTConfig.from_dict(ref.config.to_dict())).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.stack([torch.arange(total) >= total - n for n in lengths]).long()  # (B, total)


def ids(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_sequence_matches_reference(variant):
    ref = reference(**VARIANTS[variant])
    model = ours(ref)
    x = ids(2, 11)
    mask = torch.ones_like(x)
    expected = ref(input_ids=x, attention_mask=mask).logits
    got = model(model.embed(x), *decoder_inputs(mask))
    assert got.abs().std() > 1  # logits are spread, so a 1e-5 match means something
    assert_close(got, expected)
    assert_close(model(model.embed(x), *decoder_inputs(mask), last_only=True), expected[:, -1:])


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln", "proj_dim"])
def test_left_padded_batch(variant, attn):
    ref = reference(attn, **VARIANTS[variant])
    model = ours(ref)
    x = ids(3, 9)
    mask = left_padded_mask([9, 5, 2], 9)
    expected = ref(input_ids=x, attention_mask=mask).logits
    got = model(model.embed(x), *decoder_inputs(mask))
    assert not got.isnan().any()
    real = mask.bool()
    assert_close(got[real], expected[real])


@torch.no_grad()
def test_inputs_embeds_path():
    # BLIP-2 feeds the language model embeddings (query outputs + token embeddings), not ids.
    ref = reference()
    model = ours(ref)
    embeds = torch.randn(2, 7, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    mask = left_padded_mask([7, 4], 7)
    expected = ref(inputs_embeds=embeds, attention_mask=mask).logits
    got = model(embeds, *decoder_inputs(mask))
    assert_close(got[mask.bool()], expected[mask.bool()])
    assert_close(model.embed(ids(2, 7)), ref.get_input_embeddings()(ids(2, 7)))


@torch.no_grad()
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln", "proj_dim"])
def test_incremental_decoding_with_cache(variant):
    ref = reference(**VARIANTS[variant])
    model = ours(ref)
    prompt, steps = 6, 5
    x = ids(2, prompt + steps)
    mask = torch.cat([left_padded_mask([6, 3], prompt), torch.ones(2, steps, dtype=torch.long)], 1)
    full = ref(input_ids=x, attention_mask=mask).logits  # (B, prompt + steps, V)

    positions, allowed = decoder_inputs(mask)  # built once for every position
    cache = KVCache(len(model.model.decoder.layers), prompt + steps)
    head = torch.arange(prompt)
    got = model(model.embed(x[:, :prompt]), positions[:, :prompt], allowed[:, :, :prompt], cache, head, True)
    assert_close(got[:, 0], full[:, prompt - 1])
    hf = ref(input_ids=x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    for t in range(prompt, prompt + steps):
        at = torch.tensor([t])
        got = model(model.embed(x[:, t : t + 1]), positions[:, at], allowed[:, :, at], cache, at)
        hf = ref(input_ids=x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=hf.cache, use_cache=True)
        assert cache.keys[0][:, :, t].any() and not cache.keys[0][:, :, t + 1 :].any()  # written at t only
        assert_close(got[:, 0], full[:, t])
        assert_close(got[:, 0], hf.logits[:, 0])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["pre_ln", "untied", "proj_dim"])
def test_meta_build_then_assign(variant):
    ref = reference(**VARIANTS[variant])
    expected = ours(ref)
    state = ref.state_dict()
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig.from_dict(ref.config.to_dict()))
    if model.config.tie_word_embeddings:
        # A tied checkpoint may leave the head out: it is the only key missing, and tie_weights restores it.
        del state["lm_head.weight"]
        result = model.load_state_dict(state, strict=False, assign=True)
        assert result.missing_keys == list(OPTForCausalLM.tied_weights) and not result.unexpected_keys
    else:
        model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    lm_head, embed = model.lm_head.weight, model.model.decoder.embed_tokens.weight
    assert (lm_head is embed) == model.config.tie_word_embeddings
    assert not any(p.is_meta for p in model.parameters())
    x = ids(2, 8)
    mask = left_padded_mask([8, 5], 8)
    assert_close(
        model(model.embed(x), *decoder_inputs(mask))[mask.bool()],
        expected(expected.embed(x), *decoder_inputs(mask))[mask.bool()],
    )


def test_parameter_names_mirror_reference():
    for overrides in VARIANTS.values():
        ref = reference(**overrides)
        model = OPTForCausalLM(OPTConfig.from_dict(ref.config.to_dict()))
        assert set(model.state_dict()) == set(ref.state_dict())

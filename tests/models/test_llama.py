"""LLaMA language model against the reference (transformers' LlamaForCausalLM) on tiny random checkpoints."""

import pytest
import torch
import transformers

from blip2.config import LlamaConfig
from blip2.errors import CheckpointError
from blip2.models.cache import KVCache
from blip2.models.layers import decoder_inputs
from blip2.models.llama import LlamaForCausalLM

VOCAB = 120
TOL = 1e-5

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied_theta": dict(tie_word_embeddings=True, rope_theta=500.0),
    # a decode longer than the config's positions: the reference's rotary has no limit, nor has our table
    "short_table": dict(max_position_embeddings=8),
}


def reference(attn: str = "sdpa", **overrides) -> transformers.LlamaForCausalLM:
    """A tiny reference model with weights widened away from its near-uniform init (no near-ties)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm.weight" in name else 0.4 * noise)
    return model


def ours(ref: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_dict(ref.config.to_dict())).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.stack([torch.arange(total) >= total - n for n in lengths]).long()  # (B, total)


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as the reference's generate() derives them from the attention mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def ids(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < tol


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
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_left_padded_batch(variant, attn):
    ref = reference(attn, **VARIANTS[variant])
    model = ours(ref)
    x = ids(3, 9)
    mask = left_padded_mask([9, 5, 2], 9)
    expected = ref(input_ids=x, attention_mask=mask, position_ids=generate_positions(mask)).logits
    got = model(model.embed(x), *decoder_inputs(mask))
    assert not got.isnan().any()
    real = mask.bool()
    assert_close(got[real], expected[real])


@torch.no_grad()
def test_inputs_embeds_path():
    # InstructBLIP feeds the language model embeddings (query outputs + token embeddings), not ids.
    ref = reference()
    model = ours(ref)
    embeds = torch.randn(2, 7, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    mask = left_padded_mask([7, 4], 7)
    expected = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=generate_positions(mask)).logits
    got = model(embeds, *decoder_inputs(mask))
    assert_close(got[mask.bool()], expected[mask.bool()])
    assert_close(model.embed(ids(2, 7)), ref.get_input_embeddings()(ids(2, 7)))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_from_pretrained(dtype, tmp_path):
    # from_pretrained(dtype=...) keeps the reference's rotary frequencies in float32 (a later .to(dtype)
    # would round them); ours are float32 too, so the same op sequence gives the same bits.
    ref = reference(**VARIANTS["gqa"])
    ref.save_pretrained(tmp_path)
    half_ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    model = ours(ref).to(dtype)
    x = ids(3, 9)
    mask = left_padded_mask([9, 5, 2], 9)
    expected = half_ref(input_ids=x, attention_mask=mask, position_ids=generate_positions(mask)).logits
    got = model(model.embed(x), *decoder_inputs(mask))
    assert got.dtype == dtype
    assert torch.equal(got[mask.bool()], expected[mask.bool()])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["mha", "gqa", "short_table"])
def test_incremental_decoding_with_cache(variant):
    ref = reference(**VARIANTS[variant])
    model = ours(ref)
    prompt, steps = 6, 5
    x = ids(2, prompt + steps)
    mask = torch.cat([left_padded_mask([6, 3], prompt), torch.ones(2, steps, dtype=torch.long)], 1)
    pos = generate_positions(mask)
    full = ref(input_ids=x, attention_mask=mask, position_ids=pos).logits  # (B, prompt + steps, V)

    positions, allowed = decoder_inputs(mask)  # built once for every position
    cache = KVCache(len(model.model.layers), prompt + steps)
    head = torch.arange(prompt)
    got = model(model.embed(x[:, :prompt]), positions[:, :prompt], allowed[:, :, :prompt], cache, head, True)
    assert_close(got[:, 0], full[:, prompt - 1])
    hf = ref(
        input_ids=x[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt], use_cache=True
    )
    for t in range(prompt, prompt + steps):
        at = torch.tensor([t])
        got = model(model.embed(x[:, t : t + 1]), positions[:, at], allowed[:, :, at], cache, at)
        hf = ref(
            input_ids=x[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=pos[:, t : t + 1],
            cache=hf.cache,
            use_cache=True,
        )
        assert cache.keys[0][:, :, t].any() and not cache.keys[0][:, :, t + 1 :].any()  # written at t only
        assert_close(got[:, 0], hf.logits[:, 0])
        # The reference's own cached and full runs differ by float32 noise (up to ~3e-5 here).
        assert_close(got[:, 0], full[:, t], tol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_greedy_loop_matches_reference_generate(variant):
    # What InstructBLIP does: generate(inputs_embeds=..., attention_mask=...) from a left-padded prompt.
    ref = reference(**VARIANTS[variant])
    model = ours(ref)
    steps = 6
    embeds = torch.randn(3, 7, TINY["hidden_size"], generator=torch.Generator().manual_seed(4))
    mask = left_padded_mask([7, 4, 1], 7)
    out = ref.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    prompt = mask.shape[1]
    positions, allowed = decoder_inputs(torch.cat([mask, torch.ones(3, steps, dtype=mask.dtype)], 1))
    cache = KVCache(len(model.model.layers), prompt + steps)
    head = torch.arange(prompt)
    logits = model(embeds, positions[:, :prompt], allowed[:, :, :prompt], cache, head, True)  # (B, 1, V)
    for step in range(steps):
        assert_close(logits[:, 0], out.logits[step])
        token = logits[:, 0].argmax(-1, keepdim=True)  # (B, 1)
        assert token.tolist() == out.sequences[:, step : step + 1].tolist()
        pos = torch.tensor([prompt + step])
        logits = model(model.embed(token), positions[:, pos], allowed[:, :, pos], cache, pos)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["mha", "tied_theta"])
def test_meta_build_then_assign(variant):
    ref = reference(**VARIANTS[variant])
    expected = ours(ref)
    state = ref.state_dict()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(ref.config.to_dict()))
    if model.config.tie_word_embeddings:
        # A tied checkpoint may leave the head out: it is the only key missing, and tie_weights restores it.
        del state["lm_head.weight"]
        result = model.load_state_dict(state, strict=False, assign=True)
        assert result.missing_keys == list(model.tied_weights) and not result.unexpected_keys
    else:
        assert model.tied_weights == {}
        model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    lm_head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert (lm_head is embed) == model.config.tie_word_embeddings
    assert not any(p.is_meta for p in model.parameters())
    assert not any(True for _ in model.buffers())
    x = ids(2, 8)
    mask = left_padded_mask([8, 5], 8)
    assert_close(
        model(model.embed(x), *decoder_inputs(mask))[mask.bool()],
        expected(expected.embed(x), *decoder_inputs(mask))[mask.bool()],
    )


def test_parameter_names_mirror_reference():
    for overrides in VARIANTS.values():
        ref = reference(**overrides)
        model = LlamaForCausalLM(LlamaConfig.from_dict(ref.config.to_dict()))
        assert set(model.state_dict()) == set(ref.state_dict())


def test_config_from_old_and_new_rope_layouts():
    defaults = LlamaConfig()
    assert defaults.num_key_value_heads == 32 and defaults.head_dim == 128
    # transformers 4 (as in instructblip-vicuna's config.json): top-level rope_theta or none, rope_scaling null.
    assert LlamaConfig.from_dict({"rope_scaling": None}).rope_theta == 10000.0
    assert LlamaConfig.from_dict({"rope_theta": 500.0, "rope_scaling": None}).rope_theta == 500.0
    # transformers 5
    new = {"rope_parameters": {"rope_theta": 250.0, "rope_type": "default"}, "pad_token_id": None}
    config = LlamaConfig.from_dict(new)
    assert config.rope_theta == 250.0 and config.pad_token_id is None  # as transformers: no pad id
    with pytest.raises(CheckpointError, match="linear"):
        LlamaConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})

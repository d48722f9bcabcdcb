"""Quantization: the quantized Linears against float within the bound their scales give (weight-only, and
on the CPU the dynamic int8 kernel, whose activation rounding adds to it), and `load(..., quantize=)` end
to end: with the weight-only path (what CUDA runs) the quantized model computes exactly what a float model
holding the dequantized weights computes; on the CPU it runs the dynamic kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blip2
from blip2.cli import main
from blip2.errors import InputError
from blip2.loading.quantize import parse_quantize, weight_bytes
from blip2.models import quant as quant_module
from blip2.models.quant import Int4Linear, Int8Linear, needs_reduced_range, pack_int4, unpack_int4

ENGINES = [e for e in quant_module.CPU_ENGINES if e in torch.backends.quantized.supported_engines]


def float_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_features, 1) * 10)  # rows of very different ranges
        linear.weight[0, 0] = 50.0  # an outlier: row 0 gets a coarse scale, the others must not
    return linear


def test_int8_weights_within_half_a_step_of_float():
    linear = float_linear(96, 40)
    quant = Int8Linear.from_linear(linear)
    assert quant.weight.dtype == torch.int8 and quant.weight.abs().max() <= 127
    dequantized = quant.weight.float() * quant.scale[:, None]
    step = quant.scale[:, None]
    assert ((dequantized - linear.weight).abs() <= step / 2 + 1e-6).all()
    # each row's largest weight maps to +-127: its scale is its own, not the outlier row's
    assert (quant.weight.abs().amax(1) == 127).all()


def test_int8_linear_output_within_the_bound_the_scales_give():
    linear, x = float_linear(96, 40), torch.randn(3, 5, 96)
    quant = Int8Linear.from_linear(linear)
    assert quant.packed is None  # no engine: weight-only
    # |w - q s| <= s / 2 per weight, so |y - y_q| <= s_j / 2 * sum_k |x_k| for output j
    bound = quant.scale / 2 * x.abs().sum(-1, keepdim=True)
    error = (quant(x) - linear(x)).abs()
    assert (error <= bound + 1e-4).all()
    assert error.max() > 0  # it is quantized, not a float copy


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_dynamic_int8_output_within_the_bound_the_weight_and_activation_steps_give(engine, reduce_range):
    linear, x = float_linear(96, 40), torch.randn(3, 5, 96) * 4
    quant = Int8Linear.from_linear(linear, engine=engine)
    quant.reduce_range = reduce_range
    assert quant.packed is not None
    # The activations are rounded to a uint8 (7 bits with reduce_range) affine grid over the range of the
    # whole input, 0 included: step s_x, each value within s_x / 2. With w^ = q s the dequantized weight:
    # |y - y_q| <= s_j / 2 * sum_k |x_k| + s_x / 2 * sum_k |w^_jk|
    levels = 127 if reduce_range else 255
    s_x = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
    dequantized = quant.weight.float() * quant.scale[:, None]  # (out, in)
    bound = quant.scale / 2 * x.abs().sum(-1, keepdim=True) + s_x / 2 * dequantized.abs().sum(-1)
    expected = linear(x)
    error = (quant(x) - expected).abs()
    assert (error <= bound * 1.001 + 1e-4).all()
    # the activations' rounding is there: the kernel is not the weight-only product
    weight_only = Int8Linear.from_linear(linear)(x)
    assert not torch.allclose(quant(x), weight_only, rtol=1e-5, atol=1e-5)
    relative = (error.norm() / expected.norm()).item()
    assert 0 < relative < 0.05


def test_dynamic_int8_falls_back_to_weight_only_where_the_kernel_cannot_run():
    linear = float_linear(64, 8)
    quant = Int8Linear.from_linear(linear, engine=ENGINES[0])
    x = torch.randn(4, 64)
    weight_only = Int8Linear.from_linear(linear)
    # bfloat16 inputs: the weight-only path, in bfloat16
    torch.testing.assert_close(quant(x.bfloat16()), weight_only(x.bfloat16()), rtol=0, atol=0)
    # a layer that is not float32 on the CPU is never prepacked
    assert Int8Linear.from_linear(linear.bfloat16(), engine=ENGINES[0]).packed is None


@pytest.mark.parametrize("vnni", [True, False])
def test_reduced_range_only_without_vnni(monkeypatch, vnni):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    assert needs_reduced_range() is (not vnni)


def test_prepacking_keeps_the_process_wide_engine():
    before = torch.backends.quantized.engine
    for engine in ENGINES:
        Int8Linear.from_linear(nn.Linear(16, 4), engine=engine)
        assert torch.backends.quantized.engine == before


def test_int4_linear_output_within_the_bound_the_group_scales_give():
    linear, x = float_linear(256, 24, seed=1), torch.randn(7, 256)
    quant = Int4Linear.from_linear(linear, group_size=64)
    assert quant.weight.dtype == torch.uint8 and quant.weight.shape == (24, 128)
    assert quant.scale.shape == (24, 4)
    # per group g of input features: |w - q s_g| <= s_g / 2,
    # so |y - y_q| <= sum_g s_g / 2 * sum_{k in g} |x_k|
    x_groups = x.abs().reshape(7, 4, 64).sum(-1)  # (N, G)
    bound = x_groups @ (quant.scale / 2).T  # (N, out)
    error = (quant(x) - linear(x)).abs()
    assert (error <= bound + 1e-4).all()
    assert error.max() > 0


def test_int4_refuses_groups_that_do_not_split_the_row():
    with pytest.raises(ValueError, match="groups"):
        Int4Linear.from_linear(nn.Linear(200, 8), group_size=128)


def test_int4_packing_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)


def test_int8_in_float16_does_not_overflow_where_the_float_layer_does_not():
    # A small-weight row: its scale is ~1e-5, so x @ q.T in float16 (before scaling) would be far above 65504.
    linear = nn.Linear(512, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.full((4, 512), 1e-3))
    x = torch.full((2, 512), 100.0)
    expected = linear(x)  # 51.2
    got = Int8Linear.from_linear(linear)(x.half())
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    "make",
    [Int8Linear.from_linear, Int4Linear.from_linear]
    + [lambda linear, e=e: Int8Linear.from_linear(linear, engine=e) for e in ENGINES],
)
def test_zero_rows_stay_zero_and_half_inputs_keep_their_dtype(make):
    linear = nn.Linear(128, 6)
    with torch.no_grad():
        linear.weight[2] = 0
    quant = make(linear)
    x = torch.randn(4, 128)
    assert torch.equal(quant(x)[:, 2], linear.bias[2].expand(4))
    assert quant(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", ["int3", "INT 8", "", 8])
def test_bad_quantize_values_are_input_errors(checkpoints, quantize):
    with pytest.raises(InputError, match="quantize must be one of int8, int4"):
        blip2.load(checkpoints["opt"], device="cpu", quantize=quantize)


def test_int4_on_cpu_is_refused_clearly(checkpoints):
    with pytest.raises(InputError, match="needs a CUDA device.*quantize='int8'"):
        blip2.load(checkpoints["opt"], device="cpu", quantize="int4")


def test_quantize_is_checked_before_the_checkpoint_is_looked_for(tmp_path):
    with pytest.raises(InputError, match="quantize"):
        blip2.load(tmp_path / "nowhere", device="cpu", quantize="int3")


def test_parse_quantize_accepts_any_case():
    assert parse_quantize("INT8", torch.device("cpu")) == "int8"
    assert parse_quantize(None, torch.device("cpu")) is None


def dequantized_twin(quantized: blip2.Blip2, path) -> blip2.Blip2:
    """The float model of `path`, each weight that `quantized` quantized replaced by its dequantized value."""
    twin = blip2.load(path, device="cpu")
    modules = dict(twin.model.named_modules())
    for name, module in quantized.model.named_modules():
        if isinstance(module, Int8Linear):
            with torch.no_grad():
                modules[name].weight.copy_(module.weight.float() * module.scale[:, None])
    return twin


def prefill_logits(model: blip2.Blip2, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        return model.stepper(model.encode(pixels), prompts)[0].prefill()


def quantized_checkpoints(checkpoints, instruct_checkpoints):
    return {
        "opt": checkpoints["opt"],
        "t5": checkpoints["t5"],
        **{f"instruct-{lm}": path for lm, path in instruct_checkpoints.items()},
    }


@pytest.mark.parametrize("kind", ["opt", "t5", "instruct-opt", "instruct-t5", "instruct-llama"])
def test_load_int8_end_to_end(checkpoints, instruct_checkpoints, photos, kind):
    path = quantized_checkpoints(checkpoints, instruct_checkpoints)[kind]
    quant = blip2.load(path, device="cpu", quantize="int8")
    lm = quant.model.language_model
    linears = {n: type(m) for n, m in lm.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert {n for n, t in linears.items() if t is nn.Linear} == {"lm_head"}  # only the head stays float
    assert not any(isinstance(m, Int8Linear) for m in quant.model.vision_model.modules())
    assert not any(isinstance(m, Int8Linear) for m in quant.model.qformer.modules())

    float_model = blip2.load(path, device="cpu")
    assert weight_bytes(quant.model) < weight_bytes(float_model.model)

    pixels = torch.rand(2, 3, quant.config.vision.image_size, quant.config.vision.image_size)
    prompts = ["a photo of", ""]
    twin = dequantized_twin(quant, path)
    int8_layers = [m for m in lm.modules() if isinstance(m, Int8Linear)]
    assert all(m.packed is not None for m in int8_layers)  # float32 on the CPU: the dynamic kernel
    dynamic = prefill_logits(quant, pixels, prompts)
    for layer in int8_layers:
        layer.packed = None  # the weight-only path, what CUDA runs: exactly the dequantized weights' model
    torch.testing.assert_close(
        prefill_logits(quant, pixels, prompts), prefill_logits(twin, pixels, prompts), rtol=1e-4, atol=1e-4
    )
    # The dynamic kernel ran (its activation rounding is bounded per layer above; how far it moves the
    # logits end to end is measured by benchmarks/quantize_quality.py, not asserted here).
    assert torch.isfinite(dynamic).all() and not torch.allclose(
        dynamic, prefill_logits(twin, pixels, prompts)
    )
    captions = quant.caption([str(p) for p in photos[:2]], num_beams=2, max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_load_int8_all_quantizes_the_vision_tower_and_qformer_too(checkpoints, kind):
    quant = blip2.load(checkpoints[kind], device="cpu", quantize="int8-all")
    model = quant.model
    for part in (model.vision_model, model.qformer, model.language_model):
        float_linears = {n for n, m in part.named_modules() if isinstance(m, nn.Linear)}
        assert float_linears <= {"lm_head"} and any(isinstance(m, Int8Linear) for m in part.modules())
    assert isinstance(model.language_projection, nn.Linear)  # the projection stays float
    if set(ENGINES) == {"fbgemm", "onednn"}:  # decode steps (few rows) on fbgemm, image rows on oneDNN
        for part, engine in [(model.language_model, "fbgemm"), (model.vision_model, "onednn")]:
            assert {m.engine for m in part.modules() if isinstance(m, Int8Linear)} == {engine}
    pixels = torch.rand(2, 3, quant.config.vision.image_size, quant.config.vision.image_size)
    assert torch.isfinite(prefill_logits(quant, pixels, ["a photo of", ""])).all()


def test_quantized_t5_in_bfloat16_feeds_wo_in_the_compute_dtype(checkpoints):
    # T5's feed-forward casts to wo's dtype only when that weight is floating point: an int8 wo must get
    # bfloat16 activations, and the decoder must still produce finite logits.
    quant = blip2.load(checkpoints["t5"], device="cpu", dtype="bfloat16", quantize="int8")
    wo = quant.model.language_model.encoder.block[0].layer[-1].DenseReluDense.wo
    assert isinstance(wo, Int8Linear)
    seen = []
    wo.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    logits = prefill_logits(quant, torch.rand(1, 3, 224, 224), [""])
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert torch.isfinite(logits).all()


def test_retrieval_checkpoints_say_that_nothing_was_quantized(retrieval_checkpoints):
    with pytest.warns(UserWarning, match="retrieval checkpoint has none") as caught:
        model = blip2.load(retrieval_checkpoints["plain"], device="cpu", quantize="int8")
    assert caught[0].filename == __file__  # it points at the call of blip2.load
    assert not any(isinstance(m, Int8Linear) for m in model.model.modules())


def test_weight_bytes_counts_tied_weights_once():
    linear = nn.Linear(8, 4, bias=False)
    tied = nn.ModuleDict({"a": linear, "b": nn.Linear(8, 4, bias=False)})
    tied["b"].weight = linear.weight
    assert weight_bytes(tied) == 8 * 4 * 4


def caption_cli(capsys, checkpoint, image, *options):
    """`blip2 caption IMAGE -m CHECKPOINT OPTIONS...`: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(image), "-m", str(checkpoint), *options])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_quantize_matches_library(capsys, checkpoints, photos):
    expected = blip2.load(checkpoints["t5"], quantize="int8").caption(str(photos[0]), max_new_tokens=6)
    code, out, _ = caption_cli(
        capsys, checkpoints["t5"], photos[0], "--quantize", "int8", "--max-new-tokens", "6"
    )
    assert code == 0 and out.rstrip("\n") == expected


@pytest.mark.parametrize(
    ("value", "says"), [("int3", "'int3' is not one of"), ("int4", "needs a CUDA device")]
)
def test_cli_bad_quantize_is_a_usage_error(capsys, checkpoints, photos, value, says):
    code, out, err = caption_cli(
        capsys, checkpoints["opt"], photos[0], "--device", "cpu", "--quantize", value
    )
    assert code == 2 and says in err and out == "" and "Traceback" not in err

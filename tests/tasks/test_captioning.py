"""End to end against transformers on the same tiny checkpoints: logits within 1e-5, identical tokens."""

from __future__ import annotations

import threading

import pytest
import torch

import blip2
from blip2.errors import CheckpointError, ImageError, InputError
from blip2.models.registry import T5_TRAINED_LENGTH
from blip2.tasks.captioning import make_options

FAMILIES = ["opt", "t5"]
DETERMINISTIC = [
    dict(num_beams=1),
    dict(num_beams=3),
    dict(num_beams=5, length_penalty=-1.0),
    dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    dict(num_beams=1, repetition_penalty=1.5),
    dict(num_beams=3, no_repeat_ngram_size=2),
    dict(num_beams=1, min_new_tokens=8),
    dict(num_beams=4, num_return_sequences=2),
]
PROMPTS = ["", "a photo of", "Question: how many dogs are there? Answer:"]


@pytest.fixture(scope="module")
def ours(checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = blip2.load(checkpoints[name], device="cpu", dtype="float32")
        return cache[name]

    return get


def _reference(oracle, path, images, prompts, family):
    hf, processor = oracle(path)
    processor.tokenizer.padding_side = "left" if family == "opt" else "right"
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    return hf, inputs


def _hf_new_tokens(hf, inputs, family, **options):
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, **options)
    return out[:, inputs["input_ids"].shape[1] :] if family == "opt" else out[:, 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_matches_processor(family, checkpoints, oracle, ours, photos):
    _, inputs = _reference(
        oracle, checkpoints[family], [_pil(p) for p in photos], ["x"] * len(photos), family
    )
    got = ours(family).preprocess(photos)
    assert (got - inputs["pixel_values"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_match_processor(family, checkpoints, oracle, ours, photos):
    model = ours(family)
    _, inputs = _reference(oracle, checkpoints[family], [_pil(photos[0])] * 3, PROMPTS, family)
    batch = model.text.batch(PROMPTS, padding_side="left" if family == "opt" else "right")
    q = model.config.num_query_tokens
    assert torch.equal(inputs["input_ids"][:, :q], torch.full((3, q), model.config.image_token_index))
    assert torch.equal(inputs["input_ids"][:, q:], batch.ids)
    assert torch.equal(inputs["attention_mask"][:, q:], batch.mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_prefix_and_logits_match(family, checkpoints, oracle, ours, photos):
    model = ours(family)
    images = [_pil(p) for p in photos[:3]]
    hf, inputs = _reference(oracle, checkpoints[family], images, PROMPTS, family)
    with torch.no_grad():
        expected_prefix = hf.get_image_features(inputs["pixel_values"]).pooler_output
        prefix = model.encode(inputs["pixel_values"])
        assert (prefix - expected_prefix).abs().max() < 1e-5
        kwargs = {} if family == "opt" else {"decoder_input_ids": torch.zeros(3, 1, dtype=torch.long)}
        expected = hf(**inputs, **kwargs).logits[:, -1]
        got = _first_step_logits(model, prefix, PROMPTS)
    assert expected.std() > 1.0, "fixture logits are near-uniform: widen the weights"
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("options", DETERMINISTIC, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_token_identical(family, options, checkpoints, oracle, ours, photos):
    model = ours(family)
    images = [_pil(p) for p in photos[:3]]
    hf, inputs = _reference(oracle, checkpoints[family], images, PROMPTS, family)
    expected = _hf_new_tokens(hf, inputs, family, max_new_tokens=12, **options)
    with torch.no_grad():
        prefix = model.encode(inputs["pixel_values"])
        got = model.generate_ids(prefix, PROMPTS, make_options(dict(max_new_tokens=12, **options)))
    assert torch.equal(got, expected), f"\nours {got.tolist()}\nhf   {expected.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_gives_same_tokens(family, checkpoints, oracle, ours, photos):
    model = ours(f"{family}-sharded")
    hf, inputs = _reference(
        oracle, checkpoints[f"{family}-sharded"], [_pil(photos[1])], ["a photo of"], family
    )
    expected = _hf_new_tokens(hf, inputs, family, max_new_tokens=10, num_beams=3)
    with torch.no_grad():
        got = model.generate_ids(
            model.encode(inputs["pixel_values"]),
            ["a photo of"],
            make_options(dict(max_new_tokens=10, num_beams=3)),
        )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_batch_equals_one_by_one(family, num_beams, ours, photos):
    model = ours(family)
    prompts = ["a photo of", "", "Question: what is in the picture? Answer:"]
    batch = model.caption(photos[:3], prompt=prompts, num_beams=num_beams, max_new_tokens=12)
    model.batch_size = 2  # caption() then runs in chunks of two (image, prompt) pairs
    chunked = model.caption(photos[:3], prompt=prompts, num_beams=num_beams, max_new_tokens=12)
    model.batch_size = blip2.tasks.engine.DEFAULT_BATCH_SIZE
    alone = [
        model.caption(p, prompt=t, num_beams=num_beams, max_new_tokens=12) for p, t in zip(photos, prompts)
    ]
    assert batch == alone == chunked


def test_ask_encodes_image_once_and_matches_pairwise(ours, photos, monkeypatch):
    model = ours("opt")
    questions = ["what is it?", "how many dogs are there?"]
    calls = []
    original = model.model.vision_model.forward
    monkeypatch.setattr(
        model.model.vision_model, "forward", lambda x: calls.append(x.shape[0]) or original(x)
    )
    answers = model.ask(photos[0], questions, num_beams=1)
    assert calls == [1]
    assert answers == [model.ask(photos[0], q, num_beams=1) for q in questions]
    assert isinstance(model.ask(photos[0], "what is it?"), str)


def test_decode_pool_gives_the_same_output_and_errors(ours, photos, monkeypatch, tmp_path):
    """caption / ask decode the next chunk's images in threads: same texts, same error, in those threads."""
    model = ours("opt")
    monkeypatch.setattr(model, "batch_size", 2)
    threads = []
    original = blip2.images.preprocess_one
    monkeypatch.setattr(
        blip2.images,
        "preprocess_one",
        lambda image, config: threads.append(threading.current_thread().name) or original(image, config),
    )
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:200])
    questions = ["what is it?", "how many dogs are there?", "where?"]

    def outputs(workers):
        monkeypatch.setattr(blip2.tasks.batch, "DECODE_WORKERS", workers)
        threads.clear()
        captions = model.caption(photos + photos[:2], num_beams=1, max_new_tokens=8)
        answers = model.ask(photos[0], questions, num_beams=1)  # one image over two chunks: encoded once
        with pytest.raises(ImageError) as error:
            model.caption([photos[0], photos[1], broken, photos[2]], num_beams=1, max_new_tokens=4)
        return captions, answers, str(error.value), set(threads)

    *serial, serial_threads = outputs(0)
    *pooled, pooled_threads = outputs(2)
    assert pooled == serial
    assert serial_threads == {threading.current_thread().name}
    assert any(name.startswith("blip2-decode") for name in pooled_threads)  # (one image alone: no pool)


def test_ask_template_per_family(ours, photos):
    assert ours("opt").template == "Question: {} Answer:"
    assert ours("t5").template == "Question: {} Short answer:"
    model = ours("t5")
    custom = model.ask(photos[0], "what?", template="Q: {} A:", num_beams=1)
    assert custom == model.caption(
        photos[0], prompt="Q: what? A:", num_beams=1, min_new_tokens=1, max_new_tokens=10
    )


def _first_step_logits(model, prefix, prompts):
    stepper, _, _ = model.stepper(prefix, prompts)
    return stepper.prefill()


def _pil(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_float16_token_identical(options, checkpoints, oracle, photos):
    """float16: the same dtype policy as the reference (vision, projection and OPT in float16; query tokens
    and Q-Former in float32), so the same tokens. (In bfloat16 transformers 5.24 runs the Q-Former in
    bfloat16 too, while we keep it in float32, so there the two may differ.)"""
    from transformers import Blip2ForConditionalGeneration

    path = checkpoints["opt"]
    hf = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float16).eval()
    _, processor = oracle(path)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[_pil(p) for p in photos[:3]], text=PROMPTS, return_tensors="pt", padding=True)
    model = blip2.load(path, dtype="float16")
    with torch.no_grad():
        out = hf.generate(
            **{**inputs, "pixel_values": inputs["pixel_values"].half()},
            max_new_tokens=10,
            do_sample=False,
            **options,
        )
        prefix = model.encode(inputs["pixel_values"])
        got = model.generate_ids(prefix, PROMPTS, make_options(dict(max_new_tokens=10, **options)))
    assert prefix.dtype == torch.float16
    assert torch.equal(got, out[:, inputs["input_ids"].shape[1] :])


# -- num_return_sequences ---------------------------------------------------------------------------------------
def test_num_return_sequences_beams_match_transformers_grouped(checkpoints, oracle, ours, photos):
    """Beam search, n=3: one list of 3 captions per image (best first), the reference's sequences in order."""
    model = ours("opt")
    images = [_pil(p) for p in photos[:2]]
    hf, inputs = _reference(oracle, checkpoints["opt"], images, ["", ""], "opt")
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8, min_new_tokens=1)
    expected = _hf_new_tokens(hf, inputs, "opt", **options)  # (2 * 3, L)
    texts = [model.text.decode(row) for row in expected.tolist()]
    assert model.caption(photos[:2], **options) == [texts[:3], texts[3:]]
    one = model.caption(photos[0], **options)
    assert one == texts[:3]
    assert one[0] == model.caption(photos[0], **{**options, "num_return_sequences": 1})


def test_num_return_sequences_sampling_and_ask(ours, photos):
    model = ours("t5")
    sampled = model.caption(photos[:2], do_sample=True, seed=0, num_return_sequences=3, max_new_tokens=6)
    assert [len(group) for group in sampled] == [3, 3]
    assert all(isinstance(t, str) for group in sampled for t in group)
    pixels = model.preprocess(photos[:2])
    flat = model.generate_text(
        pixels,
        [0, 1],
        ["", ""],
        make_options(dict(do_sample=True, seed=0, num_return_sequences=3, max_new_tokens=6)),
    )
    assert sampled == [flat[:3], flat[3:]]
    answers = model.ask(photos[0], ["what is it?", "where?"], num_beams=2, num_return_sequences=2)
    assert [len(a) for a in answers] == [2, 2]
    assert [a[0] for a in answers] == model.ask(photos[0], ["what is it?", "where?"], num_beams=2)


# -- options through the API ------------------------------------------------------------------------------------
def test_sampling_alone_means_one_beam(ours, photos):
    model = ours("opt")
    assert blip2.tasks.captioning.task_options("caption", {"do_sample": True})["num_beams"] == 1
    assert blip2.tasks.captioning.task_options("ask", {"do_sample": True, "num_beams": 1})["num_beams"] == 1
    assert isinstance(model.caption(photos[0], do_sample=True, seed=0), str)
    with pytest.raises(InputError, match="beam sampling"):
        model.caption(photos[0], do_sample=True, num_beams=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens="10"), "max_new_tokens must be an integer, got '10'"),
        (dict(num_beams=2.0), "num_beams must be an integer, got 2.0"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
        (dict(min_new_tokens=200), r"min_new_tokens \(200\) must be <= max_new_tokens \(30\)"),
        (dict(do_sample=True, seed=2**64), "seed must be None or an integer in"),
        (dict(beams=3), "unknown generation option"),
    ],
)
def test_bad_options_fail_before_any_image_is_read(options, message, ours, tmp_path):
    with pytest.raises(InputError, match=message):
        ours("opt").caption(tmp_path / "missing.jpg", **options)


@pytest.mark.parametrize("value", [-1, 0, True, 2.5, "2", None])
def test_batch_size_is_validated(value, checkpoints):
    model = blip2.load(checkpoints["opt"], device="cpu")
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        model.batch_size = value
    assert model.batch_size == blip2.tasks.engine.DEFAULT_BATCH_SIZE
    model.batch_size = 3
    assert model.batch_size == 3


# -- prompts, templates, texts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "prompt"),
    [("Q: {} {x}", "Q: what? {x}"), ("{}{}", "what?{}"), ("{} {0} }{", "what? {0} }{")],
)
def test_template_rule_first_braces_take_the_question(template, prompt, ours, photos):
    model = ours("opt")
    assert model.ask_prompts([" what? "], template) == [prompt]
    assert model.ask(photos[0], "what?", template=template, num_beams=1) == model.caption(
        photos[0], prompt=prompt, num_beams=1, min_new_tokens=1, max_new_tokens=10
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, img: m.ask(img, "what?", template="{0}"), r"template '\{0\}' has no '\{\}'"),
        (lambda m, img: m.ask(img, "what?", template="{"), "has no '{}'"),
        (lambda m, img: m.ask(img, "what?", template=3), "template must be a string, got int"),
        (lambda m, img: m.ask(img, [1]), "questions must be non-empty strings"),
        (
            lambda m, img: m.ask(img, "what \udcff?"),
            r"questions: '\\udcff' at position 5 is a lone surrogate",
        ),
        (lambda m, img: m.ask(img, "what?", template="Q: {} \udcff"), "template: .* lone surrogate"),
        (lambda m, img: m.caption(img, prompt=5), "prompt must be a string or a list of strings, got int"),
        (lambda m, img: m.caption([img, img], prompt=["a", 2]), "prompt must be a string, got int"),
        (lambda m, img: m.caption(img, prompt="a \udcff"), "prompt: .* lone surrogate"),
    ],
)
def test_bad_prompts_are_input_errors(call, message, ours, tmp_path):
    with pytest.raises(InputError, match=message):
        call(ours("opt"), tmp_path / "missing.jpg")  # fails on the text, before the image is read


def test_retrieval_checkpoint_cannot_caption_or_ask(retrieval_checkpoints, photos):
    model = blip2.load(retrieval_checkpoints["plain"], device="cpu")
    for call in (lambda: model.ask(photos[0], "what?"), lambda: model.caption(photos[0])):
        with pytest.raises(CheckpointError, match="no language model.*use match, similarity"):
            call()


# -- lengths ----------------------------------------------------------------------------------------------------
def _prompt_of(model, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens (special tokens included)."""
    for words in range(tokens):
        for tail in ("", " a", ".", " a."):
            prompt = " ".join(["dog"] * words) + tail
            if len(model.text.encode(prompt)) == tokens:
                return prompt
    raise AssertionError(f"no prompt of {tokens} tokens")


def test_decoder_only_prompt_fills_the_positions_exactly(ours, photos):
    """OPT (128 positions, 6 query tokens): query + prompt + max_new_tokens = 128 runs to the end; one token
    more is refused, naming the input, its token count and the limit, before anything is encoded."""
    model = ours("opt")
    limit, q, new = model.config.text.max_position_embeddings, model.config.num_query_tokens, 20
    fits = _prompt_of(model, limit - q - new)
    out = model.caption(photos[0], prompt=fits, num_beams=1, min_new_tokens=new, max_new_tokens=new)
    assert isinstance(out, str)
    too_long = _prompt_of(model, limit - q - new + 1)
    with pytest.raises(
        InputError,
        match=rf"input 1: the prompt is {limit - q - new + 1} tokens, more than "
        rf"the {limit - q - new} .*{limit} positions",
    ):
        model.caption(photos[:2], prompt=["a photo of", too_long], min_new_tokens=new, max_new_tokens=new)


def test_max_new_tokens_beyond_the_positions_is_refused(ours, photos):
    with pytest.raises(InputError, match="max_new_tokens=200 leaves no room for a prompt"):
        ours("opt").caption(photos[0], max_new_tokens=200, min_new_tokens=200)
    with pytest.raises(InputError, match="max_new_tokens=600 is more than the 512 tokens Flan-T5"):
        ours("t5").caption(photos[0], max_new_tokens=600)


def test_t5_input_is_limited_to_its_trained_length(ours, photos):
    model = ours("t5")
    budget = T5_TRAINED_LENGTH - model.config.num_query_tokens
    assert isinstance(model.caption(photos[0], prompt=_prompt_of(model, budget), max_new_tokens=3), str)
    with pytest.raises(
        InputError, match=rf"input 0: the prompt is {budget + 1} tokens, more than the {budget}"
    ):
        model.caption(photos[0], prompt=_prompt_of(model, budget + 1), max_new_tokens=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_prompt_fails_fast_without_tokenizing(family, ours, tmp_path, monkeypatch):
    import resource
    import time

    model = ours(family)
    monkeypatch.setattr(model.text, "encode", lambda text: pytest.fail("a huge prompt was tokenized"))
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(InputError, match="input 0: the prompt is 10000000 characters"):
        model.caption(tmp_path / "missing.jpg", prompt="x" * 10_000_000)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: no big allocation


def test_llama_prompt_limit(instruct_checkpoints, photos):
    model = blip2.load(instruct_checkpoints["llama"], device="cpu")
    limit = model.config.text.max_position_embeddings
    with pytest.raises(InputError, match=rf"input 0: .*{limit} positions"):
        model.caption(photos[0], prompt=" ".join(["dog"] * limit))


# -- load -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(device="foo"), "device 'foo' is not a device name"),
        (dict(device="meta"), "device 'meta': no meta device is available"),
        (dict(device=5), "device must be a string"),
        (dict(dtype=5), "dtype must be a string or a torch.dtype, got int"),
        (dict(dtype="float64"), "dtype 'float64' is not supported"),
    ],
)
def test_load_checks_device_and_dtype_before_reading(kwargs, message, tmp_path):
    with pytest.raises(InputError, match=message):
        blip2.load(tmp_path / "does-not-exist", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:99"])
def test_load_refuses_cuda_without_cuda(device, tmp_path):
    with pytest.raises(InputError, match=f"device '{device}': no cuda device is available"):
        blip2.load(tmp_path / "does-not-exist", device=device)


def test_load_refuses_a_cuda_index_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="device 'cuda:99': this machine has 2 cuda device"):
        blip2.load(tmp_path / "does-not-exist", device="cuda:99")


# -- options built once -----------------------------------------------------------------------------------------
def _count_checks(monkeypatch) -> list:
    checks: list = []
    validate = blip2.generation.GenerationOptions.validate
    monkeypatch.setattr(
        blip2.generation.GenerationOptions, "validate", lambda self: checks.append(1) or validate(self)
    )
    return checks


@pytest.mark.parametrize("task", ["caption", "ask"])
def test_options_are_checked_once_per_call(task, ours, photos, monkeypatch):
    model = ours("opt")
    checks = _count_checks(monkeypatch)
    if task == "caption":
        model.caption(photos[:2], num_beams=2, max_new_tokens=4)
    else:
        model.ask(photos[0], ["what is it?", "where?"], num_beams=2, max_new_tokens=4)
    assert checks == [1]


def test_a_built_options_object_is_the_same_call_as_keywords(ours, photos):
    model = ours("opt")
    keywords = dict(num_beams=2, max_new_tokens=5)
    caption = blip2.tasks.captioning.options_for_task("caption", keywords)
    assert caption == make_options(dict(keywords, min_new_tokens=1))  # the task's defaults underneath
    assert model.caption(photos[:2], generation=caption) == model.caption(photos[:2], **keywords)
    ask = blip2.tasks.captioning.options_for_task("ask", keywords)
    assert ask.length_penalty == -1.0
    assert model.ask(photos[0], "what?", generation=ask) == model.ask(photos[0], "what?", **keywords)


def test_a_built_options_object_comes_alone(ours, photos):
    model = ours("opt")
    with pytest.raises(InputError, match="not both"):
        model.caption(photos[0], generation=make_options({}), num_beams=2)
    with pytest.raises(InputError, match="must be a GenerationOptions"):
        model.caption(photos[0], generation=dict(num_beams=2))
    with pytest.raises(InputError, match="must be a GenerationOptions"):
        model.run([photos[0]], [0], [""], dict(num_beams=2))


def test_cpu_decoding_checks_the_stop_flag_every_step(ours, photos, monkeypatch):
    """On CPU a host read costs nothing and a step past the end costs a model call: the engine asks the
    loops to stop exactly where transformers stops."""
    model = ours("opt")
    seen: list = []
    generate = blip2.tasks.engine.generate
    monkeypatch.setattr(
        blip2.tasks.engine, "generate", lambda *a, **k: seen.append(k["check_every"]) or generate(*a, **k)
    )
    model.caption(photos[0], num_beams=1, max_new_tokens=3)
    assert seen == [1]

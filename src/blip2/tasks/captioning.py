"""Captions and answers: the prompts each task gives the language model, its default generation options,
the prompt-length policy, and generation over (image, prompt) pairs a batch at a time.

Every function takes the engine first (`Blip2` exposes them as methods). The API and every front end build
their options through `options_for_task` (a task's defaults, then the caller's options, checked once), so
that the same call gives the same output; below that, options travel as one `GenerationOptions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import images as image_io
from ..config import Blip2Config
from ..errors import InputError
from ..generation import GenerationOptions
from ..models.registry import DecoderOnlyConfig, family
from . import batch, inputs
from .engine import Engine, ImageInput

# Defaults in the spirit of LAVIS: beam search for both; short answers favoured by a negative length penalty.
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=1)
ASK_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"caption": CAPTION_DEFAULTS, "ask": ASK_DEFAULTS}

# InstructBLIP is instruction-tuned: without a prompt it is asked for a caption in words.
INSTRUCT_CAPTION_PROMPT = "A short image caption:"


def caption(
    engine: Engine,
    images: ImageInput | Sequence[ImageInput],
    prompt: str | Sequence[str] | None = None,
    *,
    generation: GenerationOptions | None = None,
    **options,
) -> str | list[str] | list[list[str]]:
    """Caption one image (-> str) or a list (-> list of str); see `Blip2.caption`."""
    engine.require_language_model()
    opts = call_options("caption", generation, options)
    single = not inputs.is_list(images)
    items = inputs.as_list(images, "images")
    prompts = inputs.broadcast(prompt if prompt is not None else caption_prompt(engine), len(items), "prompt")
    texts = run(engine, items, list(range(len(items))), prompts, opts)
    return texts[0] if single else texts


def caption_prompt(engine: Engine) -> str:
    """The prompt a caption continues when none is given: empty, or InstructBLIP's request for a caption."""
    return INSTRUCT_CAPTION_PROMPT if engine.instruct else ""


def ask(
    engine: Engine,
    images: ImageInput | Sequence[ImageInput],
    questions: str | Sequence[str],
    template: str | None = None,
    *,
    generation: GenerationOptions | None = None,
    **options,
) -> str | list[str] | list[list[str]]:
    """Answer questions about images; see `Blip2.ask` for how images and questions pair up."""
    engine.require_language_model()
    opts = call_options("ask", generation, options)
    image_list = inputs.as_list(images, "images")
    rows, question_list = inputs.pairs(len(image_list), inputs.texts(questions, "questions"), "questions")
    single = not inputs.is_list(images) and not inputs.is_list(questions)
    prompts = ask_prompts(engine, question_list, template)
    answers = run(engine, image_list, rows, prompts, opts)
    return answers[0] if single else answers


def ask_prompts(engine: Engine, questions: str | Sequence[str], template: str | None = None) -> list[str]:
    """The prompts `ask` gives the language model; see `Blip2.ask_prompts`."""
    engine.require_language_model()
    template = inputs.template(template if template is not None else engine.template)
    return [inputs.fill(template, q.strip()) for q in inputs.texts(questions, "questions")]


def run(engine: Engine, images: list, rows: list[int], prompts: list[str], opts: GenerationOptions) -> list:
    """Generate for (images[rows[i]], prompts[i]) pairs, `engine.batch_size` pairs at a time: each chunk
    decodes and encodes only the images it uses, so a long list never sits in memory as pixels all at once,
    and the next chunk's images are decoded in `batch.DECODE_WORKERS` threads while the model works on the
    current one. Chunking does not change the output (a batch gives what each item gives alone).

    Returns one str per pair, or with num_return_sequences=n > 1 one list of n str per pair. Options and
    prompt lengths are checked first: a bad call fails before any image is read; an unreadable image raises
    its ImageError when its chunk is due."""
    engine.require_language_model()
    _require_options(opts)
    check_lengths(engine, prompts, opts)
    size = engine.batch_size
    chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
    new_rows = _rows_to_encode(chunks)
    pixels = batch.prepared_ahead(
        [[images[row] for row in new] for new in new_rows],
        lambda image: image_io.preprocess_one(image, engine.image_config),
        batch.DECODE_WORKERS,
    )
    texts: list[str] = []
    encoded: dict[int, Tensor] = {}  # vision-tower outputs of the images the previous chunk used
    for start, chunk, new, chunk_pixels in zip(range(0, len(rows), size), chunks, new_rows, pixels):
        used = sorted(set(chunk))
        if new:
            encoded.update(zip(new, engine.encode_vision(image_io.stack_pixels(chunk_pixels))))
        encoded = {row: encoded[row] for row in used}
        local = {row: i for i, row in enumerate(used)}
        texts += engine.generate_from_embeds(
            torch.stack([encoded[row] for row in used]),
            [local[row] for row in chunk],
            prompts[start : start + size],
            opts,
        )
    return group_returns(texts, opts.num_return_sequences)


def _rows_to_encode(chunks: list[list[int]]) -> list[list[int]]:
    """The image rows each chunk must decode and encode, sorted: those it uses that the chunk before did not
    (an image that spans chunks, one image with many questions, is decoded and encoded once)."""
    previous: set[int] = set()
    new_rows = []
    for chunk in chunks:
        used = set(chunk)
        new_rows.append(sorted(used - previous))
        previous = used
    return new_rows


def generate_text(
    engine: Engine, pixels: Tensor, rows: list[int], prompts: list[str], opts: GenerationOptions
) -> list[str]:
    """Generate one text per (image row, prompt): `rows[i]` indexes `pixels` for `prompts[i]`.
    With num_return_sequences > 1, each prompt's texts follow one another (`group_returns` nests them).
    Prompt lengths are checked before the images are encoded."""
    engine.require_language_model()
    _require_options(opts)
    check_lengths(engine, prompts, opts)
    return engine.generate_from_embeds(engine.encode_vision(pixels), rows, prompts, opts)


def check_lengths(engine: Engine, prompts: Sequence[str], opts: GenerationOptions) -> None:
    """Refuse, with an InputError naming the input, its token count and the limit, any prompt that does
    not fit the language model; nothing is truncated, and nothing has been encoded yet.

    Decoder-only (OPT, LLaMA): the query tokens, the prompt's tokens and max_new_tokens must fit in
    `max_position_embeddings` (OPT's learned table has that many rows after the 2 it reserves, and no
    more; LLaMA's RoPE was trained to that length). Flan-T5 (relative positions): the query tokens and
    the prompt must fit in the 512 tokens it was trained on, and so must max_new_tokens; its attention
    memory grows with the square of the input. A prompt longer in characters than its token budget
    times the vocabulary's longest token cannot fit and is refused without being tokenized."""
    budget = prompt_budget(engine.config, opts.max_new_tokens)
    counted: dict[str, int] = {}  # ask repeats one prompt over many images: tokenize it once
    for index, prompt in enumerate(prompts):
        if prompt not in counted:
            counted[prompt] = _count_tokens(engine, prompt, index, budget)
        if counted[prompt] > budget.tokens:
            raise InputError(
                f"input {index}: the prompt is {counted[prompt]} tokens, more than the {budget.tokens} "
                f"that fit ({budget.explain})"
            )


def _count_tokens(engine: Engine, prompt: str, index: int, budget: PromptBudget) -> int:
    max_chars = budget.tokens * engine.text.longest_token
    if len(prompt) > max_chars:
        raise InputError(
            f"input {index}: the prompt is {len(prompt)} characters, more than {budget.tokens} tokens can "
            f"hold ({max_chars}; {budget.explain})"
        )
    return len(engine.text.encode(prompt))


@dataclasses.dataclass(frozen=True)
class PromptBudget:
    tokens: int  # the most prompt tokens (special tokens included) one input may have
    explain: str  # where that number comes from, for error messages


def prompt_budget(config: Blip2Config, max_new_tokens: int) -> PromptBudget:
    """How many prompt tokens fit the language model with `config.num_query_tokens` query tokens before them
    and `max_new_tokens` to generate (the policy is in `check_lengths`). An InputError when
    max_new_tokens alone leaves no room."""
    text_cfg, q = config.text, config.num_query_tokens
    assert text_cfg is not None, "a checkpoint with a language model (see Engine.require_language_model)"
    lm_family = family(text_cfg)
    trained = lm_family.trained_input_length
    if trained is not None:  # encoder-decoder: the prompt and the new tokens are bounded apart
        if max_new_tokens > trained:
            raise InputError(
                f"max_new_tokens={max_new_tokens} is more than the {trained} tokens {lm_family.label} was "
                "trained to generate"
            )
        limit, used = trained, q
        explain = f"{q} query tokens + prompt <= {limit}, {lm_family.label}'s input"
    else:
        limit, used = cast(DecoderOnlyConfig, text_cfg).max_position_embeddings, q + max_new_tokens
        explain = f"{q} query tokens + prompt + max_new_tokens={max_new_tokens} <= {limit} positions"
    if used >= limit:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt ({explain})")
    return PromptBudget(limit - used, explain)


def group_returns(texts: list[str], count: int) -> list:
    """Flat texts, `count` per input in a row (what generate_text returns) -> one per input when count is
    1, else one list of `count` per input."""
    if count == 1:
        return texts
    return [texts[i : i + count] for i in range(0, len(texts), count)]


def task_options(task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The generation options a task ("caption", "ask") runs with, by name: its defaults, overridden by
    `options`. Sampling without an explicit num_beams samples one sequence (the defaults' 5 beams are for
    search). Nothing is checked here: `options_for_task` builds the checked object from this."""
    defaults = dict(TASK_DEFAULTS[task])
    if options.get("do_sample") and "num_beams" not in options:
        defaults["num_beams"] = 1
    return {**defaults, **options}


def options_for_task(task: str, options: Mapping[str, Any]) -> GenerationOptions:
    """The checked options of a task called with `options` (keywords, CLI flags, JSON): an InputError
    names any unknown or bad one, before any image is read. The API and every front end go through
    here, so that the same call gives the same output."""
    return GenerationOptions.from_kwargs(**task_options(task, options))


def call_options(
    task: str, generation: GenerationOptions | None, options: Mapping[str, Any]
) -> GenerationOptions:
    """The options of one API call: `generation`, a `GenerationOptions` built at the caller's edge, as
    is, or else the task's defaults overridden by the keyword `options`, never both."""
    if generation is None:
        return options_for_task(task, options)
    if options:
        raise InputError(
            f"generation options come either as keywords or as generation=GenerationOptions(...), not both "
            f"(got generation= and {', '.join(sorted(options))})"
        )
    return generation  # `run` checks that it is one


def make_options(options: Mapping[str, Any]) -> GenerationOptions:
    """`GenerationOptions.from_kwargs` over a mapping, without task defaults (tests and benchmarks)."""
    return GenerationOptions.from_kwargs(**options)


def _require_options(opts: object) -> None:
    if not isinstance(opts, GenerationOptions):
        raise InputError(
            f"generation options must be a GenerationOptions (see GenerationOptions.from_kwargs), got "
            f"{type(opts).__name__}"
        )

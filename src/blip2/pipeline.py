"""The object `blip2.load()` returns: captions and answers from images, with preprocessing, the model and
the decoding loops tied together.

Images are decoded, preprocessed and encoded once per call, whatever is asked of them: one image with
several questions runs the vision tower and the Q-Former once.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import images as image_io
from . import inputs, matching
from .config import Blip2Config
from .errors import CheckpointError, InputError
from .generation import GenerationOptions, generate
from .generation.steppers import DecoderOnlyStepper, EncoderDecoderStepper
from .models.blip2 import Blip2ForConditionalGeneration
from .models.registry import family
from .text import TextProcessor

# Defaults in the spirit of LAVIS: beam search for both; short answers favoured by a negative length penalty.
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=1)
ASK_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
TASK_DEFAULTS = {"caption": CAPTION_DEFAULTS, "ask": ASK_DEFAULTS}

DEFAULT_BATCH_SIZE = 16

# InstructBLIP is instruction-tuned: without a prompt it is asked for a caption in words.
INSTRUCT_CAPTION_PROMPT = "A short image caption:"

ImageInput = Any  # a path, bytes, a PIL image or a numpy array


class Blip2:
    """A loaded BLIP-2 checkpoint. Build it with `blip2.load(name_or_path)`."""

    def __init__(
        self,
        model: Blip2ForConditionalGeneration,
        config: Blip2Config,
        text: TextProcessor,
        image_config: image_io.ImageProcessorConfig,
        device: torch.device,
        name: str = "",
        qformer_text: TextProcessor | None = None,
    ):
        self.model = model
        self.config = config
        self.text = text
        self.image_config = image_config
        self.device = device
        self.name = name
        self.family = config.text_model_type  # "opt", "t5" or "llama"
        # InstructBLIP: the instruction is read by the Q-Former too, through its own BERT tokenizer.
        self.qformer_text = qformer_text
        self.qformer_max_length = config.qformer.max_position_embeddings
        self.instruct = config.model_type == "instructblip"
        lm_family = None if config.text is None else family(config.text)  # None: retrieval, no language model
        self.template = "{}" if self.instruct else (lm_family.ask_template if lm_family else None)
        self.caption_prompt = INSTRUCT_CAPTION_PROMPT if self.instruct else ""
        self.batch_size = DEFAULT_BATCH_SIZE

    # Matching and embeddings (ITM, ITC, features, zero-shot labels): see matching.py.
    match = matching.match
    similarity = matching.similarity
    classify = matching.classify
    embed_images = matching.embed_images
    embed_texts = matching.embed_texts
    embed_multimodal = matching.embed_multimodal

    @property
    def batch_size(self) -> int:
        """(image, prompt) pairs per forward pass in caption / ask, images per vision-tower pass in the
        matching tasks: it bounds the memory of a call, not its output. A positive integer."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"batch_size must be a positive integer, got {value!r}")
        self._batch_size = int(value)

    def __repr__(self) -> str:
        return f"Blip2({self.name!r}, language_model={self.family}, device={self.device})"

    # -- images ---------------------------------------------------------------------------------------------
    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Image(s) -> pixel tensor (B, 3, H, W), float32, as the reference BlipImageProcessor makes it
        (plus EXIF orientation and correct 16-bit conversion)."""
        return image_io.preprocess(inputs.as_list(images, "images"), self.image_config)

    @torch.inference_mode()
    def encode(
        self, pixels: Tensor, rows: Sequence[int] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        """Pixels (B, 3, H, W) -> the language model's image prefix (N, Q, D), one row per entry of `rows`
        (indices into the images; default one row per image). The vision tower runs once per image.

        InstructBLIP also reads the prompt in its Q-Former, so there the prefix depends on `prompts`
        (one per row) and the Q-Former runs once per row; BLIP-2 runs it once per image.
        """
        return self.prefix(self.encode_vision(pixels), rows, prompts)

    @torch.inference_mode()
    def encode_vision(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) -> vision-tower outputs (B, 257, C), in the tower's dtype."""
        return self.model.encode_images(pixels.to(self.device, self.model.vision_dtype))

    @torch.inference_mode()
    def prefix(
        self, image_embeds: Tensor, rows: Sequence[int] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        """Vision-tower outputs (B, 257, C) -> the image prefix (N, Q, D) of `encode`."""
        index = torch.tensor(
            list(range(len(image_embeds))) if rows is None else list(rows), device=self.device
        )
        if self.qformer_text is None:
            return self.model.project(self.model.query(image_embeds)).index_select(0, index)
        prompts = list(prompts) if prompts is not None else [""] * len(index)
        instruction = self.qformer_text.batch(
            prompts, padding_side="right", max_length=self.qformer_max_length
        )
        query = self.model.query(
            image_embeds.index_select(0, index),
            instruction.ids.to(self.device),
            instruction.mask.to(self.device),
        )
        return self.model.project(query)

    # -- tasks ----------------------------------------------------------------------------------------------
    def caption(
        self, images: ImageInput | Sequence[ImageInput], prompt: str | Sequence[str] | None = None, **options
    ) -> str | list[str] | list[list[str]]:
        """Caption one image (-> str) or a list (-> list of str).

        `prompt` is one text for all images or one per image; the caption continues it. Options are those of
        `GenerationOptions` (num_beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty,
        no_repeat_ngram_size, do_sample, temperature, top_k, top_p, seed, early_stopping,
        num_return_sequences); the defaults are beam search with 5 beams and at most 30 new tokens.
        With num_return_sequences=n > 1, each image gets a list of n captions, best first for beam search:
        one image -> list of n str, several -> a list of such lists. Prompt lengths: see `check_lengths`.
        """
        self._require_language_model()
        single = not inputs.is_list(images)
        items = inputs.as_list(images, "images")
        prompts = inputs.broadcast(
            prompt if prompt is not None else self.caption_prompt, len(items), "prompt"
        )
        texts = self.run(items, list(range(len(items))), prompts, task_options("caption", options))
        return texts[0] if single else texts

    def ask(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        template: str | None = None,
        **options,
    ) -> str | list[str] | list[list[str]]:
        """Answer questions about images.

        One image and one question -> str. One image and several questions -> a list (the image is encoded
        once). Several images and one question -> one answer per image. Several of each, the same number ->
        answers pairwise. With num_return_sequences=n > 1, each answer becomes a list of n answers.
        `template` wraps each question (default "Question: {} Answer:" for OPT, "Question: {} Short answer:"
        for Flan-T5; see `ask_prompts`). Defaults: 5 beams, at most 10 new tokens, length_penalty -1.
        """
        self._require_language_model()
        image_list = inputs.as_list(images, "images")
        rows, question_list = inputs.pairs(len(image_list), inputs.texts(questions, "questions"), "questions")
        single = not inputs.is_list(images) and not inputs.is_list(questions)
        prompts = self.ask_prompts(question_list, template)
        answers = self.run(image_list, rows, prompts, task_options("ask", options))
        return answers[0] if single else answers

    def ask_prompts(self, questions: str | Sequence[str], template: str | None = None) -> list[str]:
        """The prompts `ask` gives the language model: each question, stripped, in `template` (default: the
        checkpoint's). The template rule: the first `{}` is replaced by the question and every other brace
        is kept as written ("Q: {} {x}" -> "Q: what? {x}"); a template without `{}` is an InputError."""
        self._require_language_model()
        template = inputs.template(template if template is not None else self.template)
        return [inputs.fill(template, q.strip()) for q in inputs.texts(questions, "questions")]

    # -- the engine -----------------------------------------------------------------------------------------
    def run(self, images: list, rows: list[int], prompts: list[str], options: dict) -> list:
        """Generate for (images[rows[i]], prompts[i]) pairs, `batch_size` pairs at a time: each chunk decodes
        and encodes only the images it uses, so a long list never sits in memory as pixels all at once.
        Chunking does not change the output (a batch gives what each item gives alone).

        Returns one str per pair, or with num_return_sequences=n > 1 one list of n str per pair. Options and
        prompt lengths are checked first: a bad call fails before any image is read."""
        self._require_language_model()
        opts = make_options(options)
        self.check_lengths(prompts, opts)
        texts: list[str] = []
        encoded: dict[int, Tensor] = {}  # vision-tower outputs of the images the previous chunk used
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            used = sorted(set(chunk))
            # An image that spans chunks (one image, many questions) is decoded and encoded once.
            new = [row for row in used if row not in encoded]
            if new:
                encoded.update(zip(new, self.encode_vision(self.preprocess([images[row] for row in new]))))
            encoded = {row: encoded[row] for row in used}
            local = {row: i for i, row in enumerate(used)}
            texts += self._generate_text(
                torch.stack([encoded[row] for row in used]),
                [local[row] for row in chunk],
                prompts[start : start + self.batch_size],
                opts,
            )
        return group_returns(texts, opts.num_return_sequences)

    def generate_text(self, pixels: Tensor, rows: list[int], prompts: list[str], options: dict) -> list[str]:
        """Generate one text per (image row, prompt): `rows[i]` indexes `pixels` for `prompts[i]`.
        With num_return_sequences > 1, each prompt's texts follow one another (`group_returns` nests them).
        Options and prompt lengths are checked before the images are encoded."""
        self._require_language_model()
        opts = make_options(options)
        self.check_lengths(prompts, opts)
        return self._generate_text(self.encode_vision(pixels), rows, prompts, opts)

    @torch.inference_mode()
    def _generate_text(
        self, image_embeds: Tensor, rows: list[int], prompts: list[str], opts: GenerationOptions
    ) -> list[str]:
        """Vision-tower outputs (B, 257, C) and (row, prompt) pairs -> texts."""
        prefix = self.prefix(image_embeds, rows, prompts)  # (N, Q, D)
        ids = self.generate_ids(prefix, prompts, opts)
        return [self.text.decode(row) for row in ids.tolist()]

    def check_lengths(self, prompts: Sequence[str], opts: GenerationOptions) -> None:
        """Refuse, with an InputError naming the input, its token count and the limit, any prompt that does
        not fit the language model; nothing is truncated, and nothing has been encoded yet.

        Decoder-only (OPT, LLaMA): the query tokens, the prompt's tokens and max_new_tokens must fit in
        `max_position_embeddings` (OPT's learned table has that many rows after the 2 it reserves, and no
        more; LLaMA's RoPE was trained to that length). Flan-T5 (relative positions): the query tokens and
        the prompt must fit in the 512 tokens it was trained on, and so must max_new_tokens; its attention
        memory grows with the square of the input. A prompt longer in characters than its token budget
        times the vocabulary's longest token cannot fit and is refused without being tokenized."""
        budget = prompt_budget(self.config, opts.max_new_tokens)
        counted: dict[str, int] = {}  # ask repeats one prompt over many images: tokenize it once
        for index, prompt in enumerate(prompts):
            if prompt not in counted:
                counted[prompt] = self._count_tokens(prompt, index, budget)
            if counted[prompt] > budget.tokens:
                raise InputError(
                    f"input {index}: the prompt is {counted[prompt]} tokens, more than the {budget.tokens} "
                    f"that fit ({budget.explain})"
                )

    def _count_tokens(self, prompt: str, index: int, budget: PromptBudget) -> int:
        max_chars = budget.tokens * self.text.longest_token
        if len(prompt) > max_chars:
            raise InputError(
                f"input {index}: the prompt is {len(prompt)} characters, more than {budget.tokens} tokens can "
                f"hold ({max_chars}; {budget.explain})"
            )
        return len(self.text.encode(prompt))

    def _require_language_model(self) -> None:
        if self.config.text is None:
            raise CheckpointError(
                f"{self.name} is an image-text retrieval checkpoint with no language model: it cannot caption or "
                "answer; use match, similarity, classify or embed_images / embed_texts"
            )

    def generate_ids(self, prefix: Tensor, prompts: list[str], opts: GenerationOptions) -> Tensor:
        """Image prefix (N, Q, D) and N prompts -> new token ids (N * num_return_sequences, L)."""
        stepper, history, history_mask = self.stepper(prefix, prompts)
        text_cfg = self.config.text
        return generate(
            stepper,
            history,
            opts,
            eos_token_id=text_cfg.eos_token_id,
            pad_token_id=_pad_id(text_cfg),
            attention_mask=history_mask,
        )

    def stepper(self, prefix: Tensor, prompts: list[str]):
        """The language model's input for (image prefix, prompt) rows, as a decoding Stepper.

        Returns (stepper, history, history_mask): `history` is what the reference's logits processors see
        as input_ids (decoder-only: the query placeholders, then the padded prompt; encoder-decoder: the
        decoder start token), and `history_mask` its attention mask (None for encoder-decoder, as there).
        """
        lm = self.model.language_model
        n, q = prefix.shape[:2]
        text_cfg = self.config.text
        lm_family = family(text_cfg)
        batch = self.text.batch(prompts, padding_side=lm_family.padding_side)
        ids, text_mask = batch.ids.to(self.device), batch.mask.to(self.device)
        text_embeds = lm.embed(ids)  # (N, T, D)
        embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], dim=1)  # (N, Q + T, D)
        mask = torch.cat([text_mask.new_ones(n, q), text_mask], dim=1)
        layers = lm_family.decoder_layers(text_cfg)
        if lm_family.is_encoder_decoder:
            stepper = EncoderDecoderStepper(lm, embeds, mask, text_cfg.decoder_start_token_id, layers)
            return stepper, ids.new_full((n, 1), text_cfg.decoder_start_token_id), None
        stepper = DecoderOnlyStepper(lm, embeds, mask, layers)
        placeholder = self.config.image_token_index
        if placeholder is None:  # checkpoints without placeholders: the text alone, as transformers 4 did
            return stepper, ids, text_mask
        return stepper, torch.cat([ids.new_full((n, q), placeholder), ids], dim=1), mask


@dataclasses.dataclass(frozen=True)
class PromptBudget:
    tokens: int  # the most prompt tokens (special tokens included) one input may have
    explain: str  # where that number comes from, for error messages


def prompt_budget(config: Blip2Config, max_new_tokens: int) -> PromptBudget:
    """How many prompt tokens fit the language model with `config.num_query_tokens` query tokens before them
    and `max_new_tokens` to generate (the policy is in `Blip2.check_lengths`). An InputError when
    max_new_tokens alone leaves no room."""
    text_cfg, q = config.text, config.num_query_tokens
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
        limit, used = text_cfg.max_position_embeddings, q + max_new_tokens
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


def _pad_id(text_cfg) -> int:
    """The id that fills finished rows: the config's pad token, else the first EOS (as the reference does)."""
    if text_cfg.pad_token_id is not None:
        return text_cfg.pad_token_id
    eos = text_cfg.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def task_options(task: str, options: dict) -> dict:
    """The generation options a task ("caption", "ask") runs with: its defaults, overridden by `options`.
    Sampling without an explicit num_beams samples one sequence (the defaults' 5 beams are for search).
    The API and every front end go through here, so that the same call gives the same output."""
    defaults = dict(TASK_DEFAULTS[task])
    if options.get("do_sample") and "num_beams" not in options:
        defaults["num_beams"] = 1
    merged = {**defaults, **options}
    make_options(merged)  # a bad option fails here, before any image is read
    return merged


def make_options(options: dict) -> GenerationOptions:
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(
            f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    opts = GenerationOptions(**options)
    opts.validate()
    return opts


# -- loading ----------------------------------------------------------------------------------------------------
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype `load` asks for: a torch.dtype or one of DTYPES' names; None is float32 on CPU, else float16."""
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise InputError(f"dtype must be a string or a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported (float32, float16, bfloat16)") from None


def load(
    name_or_path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Blip2:
    """Load a BLIP-2 checkpoint: a local directory in the Hugging Face layout, or a Hub repo id.

    Captioning / VQA checkpoints (BLIP-2 with OPT or Flan-T5, InstructBLIP with Flan-T5 or Vicuna) and the
    image-text retrieval checkpoints (blip2-itm-vit-g: match, similarity, classify, embeddings).

    device: "cpu", "cuda", "cuda:1", ... (default: CUDA when available). dtype: float32 (default on CPU),
    float16 (default on GPU) or bfloat16. The Q-Former stays in float32, as in the reference; a Flan-T5
    language model asked for in float16 is kept in bfloat16, because T5 overflows in float16.
    """
    from .hub import resolve

    device = parse_device(device)  # a wrong device or dtype fails before anything is read or downloaded
    dtype = parse_dtype(dtype, device)
    return load_directory(resolve(name_or_path), device, dtype, str(name_or_path))


def load_directory(directory: Path, device: torch.device, dtype: torch.dtype, name: str = "") -> Blip2:
    """Build the pipeline object for a local checkpoint directory (see `load`)."""
    from .config import read_config
    from .models.retrieval import Blip2ForImageTextRetrieval
    from .weights import (
        assign_weights,
        check_config_against_checkpoint,
        checkpoint_files,
        dtype_plan,
        lm_dtype,
        read_tensors,
    )

    config, raw = read_config(directory)  # bounds-checked; generation_config.json's token ids applied
    if matching.is_retrieval(raw):
        # Their config.json carries a default text_config although there is no language model.
        config = dataclasses.replace(config, text=None)
        if not config.qformer.use_qformer_text_input:
            raise CheckpointError(
                f"{directory}: a retrieval checkpoint needs qformer_config.use_qformer_text_input"
            )
        model_class = Blip2ForImageTextRetrieval
    elif config.text is None:
        raise CheckpointError(f"{directory}: config.json has no text_config (no language model)")
    else:
        model_class = Blip2ForConditionalGeneration
        lm = lm_dtype(config, dtype)
        if lm != dtype:
            warnings.warn(
                f"{family(config.text).label} overflows in float16: its language model is loaded in "
                f"{str(lm).removeprefix('torch.')} instead",
                stacklevel=3,
            )
    # Everything small is read and checked before the weights: a bad file fails in a second, not after
    # gigabytes, and the config is checked against the tensor shapes before anything is built from it.
    files = checkpoint_files(directory)
    check_config_against_checkpoint(config, files)
    image_config = image_io.ImageProcessorConfig.from_checkpoint(directory)
    text = TextProcessor.from_dir(directory)
    qformer_text = None
    if config.model_type == "instructblip":
        qformer_text = TextProcessor.from_dir(directory / "qformer_tokenizer")
    with torch.device("meta"):
        model = model_class(config)
    plan = dtype_plan(config, dtype)
    assign_weights(model, read_tensors(files, device), plan)
    model.set_compute_dtypes(plan)
    model.eval().requires_grad_(False)
    return Blip2(
        model,
        config,
        text,
        image_config,
        device,
        name or str(directory),
        qformer_text=qformer_text,
    )


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device `load` puts the model on: a name torch knows ("cpu", "cuda", "cuda:1", "mps", ...) of a
    device present here, or None for CUDA when available, else the CPU."""
    if device is None:
        return _default_device()
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise InputError(f"device {device!r}: no {parsed.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise InputError(f"device {device!r}: this machine has {count} {parsed.type} device(s), from 0")
    return parsed


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

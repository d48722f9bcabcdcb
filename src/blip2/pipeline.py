"""The object `blip2.load()` returns: captions and answers from images, with preprocessing, the model and
the decoding loops tied together.

Images are decoded, preprocessed and encoded once per call, whatever is asked of them: one image with
several questions runs the vision tower and the Q-Former once.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import images as image_io
from . import inputs, matching
from .config import Blip2Config, T5Config
from .errors import CheckpointError, InputError
from .generation import GenerationOptions, generate
from .generation.steppers import DecoderOnlyStepper, EncoderDecoderStepper
from .models.blip2 import Blip2ForConditionalGeneration
from .text import PROMPT_TEMPLATES, TextProcessor

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
        self.template = "{}" if self.instruct else PROMPT_TEMPLATES.get(self.family)
        self.caption_prompt = INSTRUCT_CAPTION_PROMPT if self.instruct else ""
        self.batch_size = DEFAULT_BATCH_SIZE  # (image, prompt) pairs per forward pass in caption / ask

    # Matching and embeddings (ITM, ITC, features, zero-shot labels): see matching.py.
    match = matching.match
    similarity = matching.similarity
    classify = matching.classify
    embed_images = matching.embed_images
    embed_texts = matching.embed_texts
    embed_multimodal = matching.embed_multimodal

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
        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        image_embeds = self.model.encode_images(pixels.to(self.device, dtype))  # (B, 257, C)
        index = torch.tensor(list(range(len(pixels))) if rows is None else list(rows), device=self.device)
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
    ) -> str | list[str]:
        """Caption one image (-> str) or a list (-> list of str).

        `prompt` is one text for all images or one per image; the caption continues it. Options are those of
        `GenerationOptions` (num_beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty,
        no_repeat_ngram_size, do_sample, temperature, top_k, top_p, seed, early_stopping); the defaults are
        beam search with 5 beams and at most 30 new tokens.
        """
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
    ) -> str | list[str]:
        """Answer questions about images.

        One image and one question -> str. One image and several questions -> a list (the image is encoded
        once). Several images and one question -> one answer per image. Several of each, the same number ->
        answers pairwise. `template` wraps each question (default "Question: {} Answer:" for OPT, "Question:
        {} Short answer:" for Flan-T5). Defaults: 5 beams, at most 10 new tokens, length_penalty -1.
        """
        template = template or self.template
        if "{}" not in template:
            raise InputError(f"template {template!r} has no '{{}}' where the question goes")
        image_list = inputs.as_list(images, "images")
        rows, question_list = inputs.pairs(len(image_list), inputs.texts(questions, "questions"), "questions")
        single = not inputs.is_list(images) and not inputs.is_list(questions)
        prompts = [template.format(q.strip()) for q in question_list]
        answers = self.run(image_list, rows, prompts, task_options("ask", options))
        return answers[0] if single else answers

    # -- the engine -----------------------------------------------------------------------------------------
    def run(self, images: list, rows: list[int], prompts: list[str], options: dict) -> list[str]:
        """Generate for (images[rows[i]], prompts[i]) pairs, `batch_size` pairs at a time: each chunk decodes
        and encodes only the images it uses, so a long list never sits in memory as pixels all at once.
        Chunking does not change the output (a batch gives what each item gives alone)."""
        self._require_language_model()
        make_options(options)  # a bad option fails before any image is read
        texts: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            used = sorted(set(chunk))
            local = {row: i for i, row in enumerate(used)}
            pixels = self.preprocess([images[row] for row in used])
            texts += self.generate_text(
                pixels, [local[row] for row in chunk], prompts[start : start + self.batch_size], options
            )
        return texts

    @torch.inference_mode()
    def generate_text(self, pixels: Tensor, rows: list[int], prompts: list[str], options: dict) -> list[str]:
        """Generate one text per (image row, prompt): `rows[i]` indexes `pixels` for `prompts[i]`.
        With num_return_sequences > 1, each prompt's texts follow one another."""
        self._require_language_model()
        opts = make_options(options)
        prefix = self.encode(pixels, rows, prompts)  # (N, Q, D)
        ids = self.generate_ids(prefix, prompts, opts)
        return [self.text.decode(row) for row in ids.tolist()]

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
        batch = self.text.batch(prompts, padding_side="right" if self.config.is_encoder_decoder else "left")
        ids, text_mask = batch.ids.to(self.device), batch.mask.to(self.device)
        text_embeds = lm.embed(ids)  # (N, T, D)
        embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], dim=1)  # (N, Q + T, D)
        mask = torch.cat([text_mask.new_ones(n, q), text_mask], dim=1)
        if isinstance(text_cfg, T5Config):
            stepper = EncoderDecoderStepper(
                lm, embeds, mask, text_cfg.decoder_start_token_id, text_cfg.num_decoder_layers
            )
            return stepper, ids.new_full((n, 1), text_cfg.decoder_start_token_id), None
        stepper = DecoderOnlyStepper(lm, embeds, mask, text_cfg.num_hidden_layers)  # OPT, LLaMA
        placeholder = self.config.image_token_index
        if placeholder is None:  # checkpoints without placeholders: the text alone, as transformers 4 did
            return stepper, ids, text_mask
        return stepper, torch.cat([ids.new_full((n, q), placeholder), ids], dim=1), mask


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
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
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

    directory = resolve(name_or_path)
    device = torch.device(device) if device is not None else _default_device()
    return load_directory(directory, device, parse_dtype(dtype, device), str(name_or_path))


def load_directory(directory: Path, device: torch.device, dtype: torch.dtype, name: str = "") -> Blip2:
    """Build the pipeline object for a local checkpoint directory (see `load`)."""
    from .models.retrieval import Blip2ForImageTextRetrieval
    from .weights import assign_weights, checkpoint_files, dtype_plan, lm_dtype, read_tensors

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: cannot be read ({e})") from None
    config = Blip2Config.from_dict(raw)
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
        if lm_dtype(config, dtype) != dtype:
            warnings.warn(
                "Flan-T5 overflows in float16: its language model is loaded in bfloat16 instead", stacklevel=3
            )
    with torch.device("meta"):
        model = model_class(config)
    assign_weights(model, read_tensors(checkpoint_files(directory), device), dtype_plan(config, dtype))
    model.eval().requires_grad_(False)
    image_config = image_io.ImageProcessorConfig.from_checkpoint(directory)
    qformer_text = None
    if config.model_type == "instructblip":
        qformer_text = TextProcessor.from_dir(directory / "qformer_tokenizer")
    return Blip2(
        model,
        config,
        TextProcessor.from_dir(directory),
        image_config,
        device,
        name or str(directory),
        qformer_text=qformer_text,
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""The engine: a loaded checkpoint ready to compute. Images -> pixels -> vision-tower outputs -> the language
model's image prefix -> generated token ids, with the prompt layout and the decoding stepper of the
checkpoint's family. The task functions (captioning.py, matching.py) work through it; `api.Blip2` is the
engine with the tasks as methods.

Images are decoded, preprocessed and encoded once per call, whatever is asked of them: one image with
several questions runs the vision tower and the Q-Former once.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import images as image_io
from ..config import TextConfig
from ..errors import CheckpointError, InputError
from ..generation import GenerationOptions, generate
from ..generation.decoding import OnStep
from ..generation.steppers import DecoderOnlyStepper, EncoderDecoderStepper, Stepper
from ..loading.loader import Checkpoint
from ..models.blip2 import Blip2Base, Blip2ForConditionalGeneration
from ..models.registry import EncoderDecoderConfig, family
from . import inputs

DEFAULT_BATCH_SIZE = 16
# Decode steps between reads of the stop flag on an accelerator (see blip2.generation.decoding): the host
# queues this many steps without waiting for the device, and may run up to this many - 1 past the end (their
# output is dropped). On CPU there is no queue to keep full: read it every step, and never step past the end.
ACCELERATOR_CHECK_EVERY = 4

ImageInput = Any  # a path, bytes, a PIL image or a numpy array


class Engine:
    """A loaded checkpoint: the model, its config and processors, the device it runs on."""

    _batch_size: int

    def __init__(self, checkpoint: Checkpoint):
        # Post-load transforms (quantization, compilation) keep the model's methods, whatever they return.
        self.model = cast(Blip2Base, checkpoint.model)
        self.config = config = checkpoint.config
        self.text = checkpoint.processors.text
        self.image_config = checkpoint.processors.image_config
        self.device = checkpoint.device
        self.name = checkpoint.name
        self.family = config.text_model_type  # "opt", "t5" or "llama"
        # InstructBLIP: the instruction is read by the Q-Former too, through its own BERT tokenizer.
        self.qformer_text = checkpoint.processors.qformer_text
        self.qformer_max_length = config.qformer.max_position_embeddings
        self.instruct = config.model_type == "instructblip"
        lm_family = None if config.text is None else family(config.text)  # None: retrieval, no language model
        self.template = "{}" if self.instruct else (lm_family.ask_template if lm_family else None)
        self.batch_size = DEFAULT_BATCH_SIZE
        # Sees each decoding step's tokens (greedy and sampling; see `generation.decoding.OnStep`): set by
        # the server around one streamed call on the thread that owns this model, None otherwise.
        self.on_step: OnStep | None = None

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
        return f"{type(self).__name__}({self.name!r}, language_model={self.family}, device={self.device})"

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
            return self.captioner.project(self.model.query(image_embeds)).index_select(0, index)
        prompts = list(prompts) if prompts is not None else [""] * len(index)
        instruction = self.qformer_text.batch(
            prompts, padding_side="right", max_length=self.qformer_max_length
        )
        query = self.model.query(
            image_embeds.index_select(0, index),
            instruction.ids.to(self.device),
            instruction.mask.to(self.device),
        )
        return self.captioner.project(query)

    @torch.inference_mode()
    def generate_from_embeds(
        self, image_embeds: Tensor, rows: list[int], prompts: list[str], opts: GenerationOptions
    ) -> list[str]:
        """Vision-tower outputs (B, 257, C) and (row, prompt) pairs -> texts: `rows[i]` indexes `image_embeds`
        for `prompts[i]`; with num_return_sequences > 1, each prompt's texts follow one another."""
        prefix = self.prefix(image_embeds, rows, prompts)  # (N, Q, D)
        ids = self.generate_ids(prefix, prompts, opts)
        return [self.text.decode(row) for row in ids.tolist()]

    @property
    def captioner(self) -> Blip2ForConditionalGeneration:
        """The model with its language model: what `require_language_model` checks the checkpoint has."""
        return cast(Blip2ForConditionalGeneration, self.model)

    @property
    def text_config(self) -> TextConfig:
        """The language model's config: what `require_language_model` checks the checkpoint has."""
        assert self.config.text is not None
        return self.config.text

    def require_language_model(self) -> None:
        """A CheckpointError unless the checkpoint can caption and answer (retrieval checkpoints cannot)."""
        if self.config.text is None:
            raise CheckpointError(
                f"{self.name} is an image-text retrieval checkpoint with no language model: it cannot caption or "
                "answer; use match, similarity, classify or embed_images / embed_texts"
            )

    def generate_ids(self, prefix: Tensor, prompts: list[str], opts: GenerationOptions) -> Tensor:
        """Image prefix (N, Q, D) and N prompts -> new token ids (N * num_return_sequences, L)."""
        stepper, history, history_mask = self.stepper(prefix, prompts)
        text_cfg = self.text_config
        return generate(
            stepper,
            history,
            opts,
            eos_token_id=text_cfg.eos_token_id,
            pad_token_id=_pad_id(text_cfg),
            attention_mask=history_mask,
            check_every=1 if prefix.device.type == "cpu" else ACCELERATOR_CHECK_EVERY,
            on_step=self.on_step,
        )

    def stepper(self, prefix: Tensor, prompts: list[str]) -> tuple[Stepper, Tensor, Tensor | None]:
        """The language model's input for (image prefix, prompt) rows, as a decoding Stepper.

        Returns (stepper, history, history_mask): `history` is what the reference's logits processors see
        as input_ids (decoder-only: the query placeholders, then the padded prompt; encoder-decoder: the
        decoder start token), and `history_mask` its attention mask (None for encoder-decoder, as there).
        """
        lm = self.captioner.language_model
        n, q = prefix.shape[:2]
        text_cfg = self.text_config
        lm_family = family(text_cfg)
        batch = self.text.batch(prompts, padding_side=lm_family.padding_side)
        ids, text_mask = batch.ids.to(self.device), batch.mask.to(self.device)
        text_embeds = lm.embed(ids)  # (N, T, D)
        embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], dim=1)  # (N, Q + T, D)
        mask = torch.cat([text_mask.new_ones(n, q), text_mask], dim=1)
        layers = lm_family.decoder_layers(text_cfg)
        if lm_family.is_encoder_decoder:
            start = cast(EncoderDecoderConfig, text_cfg).decoder_start_token_id
            return EncoderDecoderStepper(lm, embeds, mask, start, layers), ids.new_full((n, 1), start), None
        stepper = DecoderOnlyStepper(lm, embeds, mask, layers)
        placeholder = self.config.image_token_index
        if placeholder is None:  # checkpoints without placeholders: the text alone, as transformers 4 did
            return stepper, ids, text_mask
        return stepper, torch.cat([ids.new_full((n, q), placeholder), ids], dim=1), mask


def _pad_id(text_cfg: TextConfig) -> int:
    """The id that fills finished rows: the config's pad token, else the first EOS (as the reference does)."""
    if text_cfg.pad_token_id is not None:
        return text_cfg.pad_token_id
    eos = text_cfg.eos_token_id
    return eos[0] if isinstance(eos, list) else eos

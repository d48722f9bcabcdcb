"""`Blip2`, the object `blip2.load()` returns: the engine with the task API as methods, each a call into
captioning.py or matching.py, which take the engine first and import nothing from here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import read_json
from ..generation import GenerationOptions
from ..loading.loader import is_retrieval, load_checkpoint, load_directory
from . import captioning, matching
from .engine import Engine, ImageInput


class Blip2(Engine):
    """A loaded BLIP-2 checkpoint. Build it with `blip2.load(name_or_path)`."""

    # -- captions and answers -------------------------------------------------------------------------------
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str] | None = None,
        *,
        generation: GenerationOptions | None = None,
        **options,
    ) -> str | list[str] | list[list[str]]:
        """Caption one image (-> str) or a list (-> list of str).

        `prompt` is one text for all images or one per image; the caption continues it. Options are those of
        `GenerationOptions` (num_beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty,
        no_repeat_ngram_size, do_sample, temperature, top_k, top_p, seed, early_stopping,
        num_return_sequences); the defaults are beam search with 5 beams and at most 30 new tokens.
        With num_return_sequences=n > 1, each image gets a list of n captions, best first for beam search:
        one image -> list of n str, several -> a list of such lists. Prompt lengths: see `check_lengths`.
        Instead of keywords, `generation` may give every option as one `GenerationOptions` (built once,
        e.g. with `captioning.options_for_task("caption", {...})`, and reused); it replaces the defaults.
        """
        return captioning.caption(self, images, prompt, generation=generation, **options)

    def ask(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        template: str | None = None,
        *,
        generation: GenerationOptions | None = None,
        **options,
    ) -> str | list[str] | list[list[str]]:
        """Answer questions about images.

        One image and one question -> str. One image and several questions -> a list (the image is encoded
        once). Several images and one question -> one answer per image. Several of each, the same number ->
        answers pairwise. With num_return_sequences=n > 1, each answer becomes a list of n answers.
        `template` wraps each question (default "Question: {} Answer:" for OPT, "Question: {} Short answer:"
        for Flan-T5; see `ask_prompts`). Defaults: 5 beams, at most 10 new tokens, length_penalty -1.
        Options are keywords, as for `caption`, or one `GenerationOptions` as `generation`.
        """
        return captioning.ask(self, images, questions, template, generation=generation, **options)

    def ask_prompts(self, questions: str | Sequence[str], template: str | None = None) -> list[str]:
        """The prompts `ask` gives the language model: each question, stripped, in `template` (default: the
        checkpoint's). The template rule: the first `{}` is replaced by the question and every other brace
        is kept as written ("Q: {} {x}" -> "Q: what? {x}"); a template without `{}` is an InputError."""
        return captioning.ask_prompts(self, questions, template)

    def run(self, images: list, rows: list[int], prompts: list[str], opts: GenerationOptions) -> list:
        """Generate for (images[rows[i]], prompts[i]) pairs, `batch_size` pairs at a time (see
        `captioning.run`)."""
        return captioning.run(self, images, rows, prompts, opts)

    def generate_text(
        self, pixels: Tensor, rows: list[int], prompts: list[str], opts: GenerationOptions
    ) -> list[str]:
        """Generate one text per (image row, prompt) from pixels (see `captioning.generate_text`)."""
        return captioning.generate_text(self, pixels, rows, prompts, opts)

    def check_lengths(self, prompts: Sequence[str], opts: GenerationOptions) -> None:
        """An InputError for any prompt that does not fit the language model (see `captioning.check_lengths`)."""
        captioning.check_lengths(self, prompts, opts)

    # -- matching and embeddings (retrieval checkpoints) ----------------------------------------------------
    def match(
        self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
    ) -> float | list[float]:
        """The ITM probability that each image matches its text (softmax of the ITM head, class 1).

        One image and one text -> float. One image and several texts, or several images and one text, -> one
        probability per text / image (each image is encoded once). Several of each, the same number -> pairwise.
        """
        return matching.match(self, images, texts)

    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> Tensor:
        """ITC similarity matrix (n_images, n_texts): for each pair, the largest cosine between the image's
        projected query outputs (one per query token) and the text's projected [CLS] output, in [-1, 1]."""
        return matching.similarity(self, images, texts)

    def classify(
        self,
        image: ImageInput,
        labels: Sequence[str],
        template: str = "a photo of {}",
        rerank: bool = False,
        top_k: int | None = None,
        temperature: float = matching.ITC_TEMPERATURE,
    ) -> list[dict[str, Any]]:
        """Zero-shot classification of one image among `labels`, best first.

        Each label is put into `template` ("{}" marks where) and compared with the image by ITC. Each result is
        `{"label", "score", "probability"}`: `score` is the ITC similarity (the best cosine over the query tokens,
        as `similarity`), `probability` is softmax over all labels of score / `temperature` (LAVIS's 0.07 by
        default: the checkpoints do not store their learned temperature). With `top_k`, only the `top_k` best
        labels by score are returned. With `rerank=True`, those candidates (all labels without `top_k`) are also
        scored by the ITM head, which reads image and text together: each gets `"match"`, its ITM probability, and
        the list is ordered by it instead; `probability` stays the ITC one.
        """
        return matching.classify(self, image, labels, template, rerank, top_k, temperature)

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, Tensor]:
        """Image features, one row per image (a single image gives a batch of one):

        - `image_embeds` (B, Q, 768): the Q-Former's query outputs;
        - `image_embeds_proj` (B, Q, 256): their L2-normalised ITC projections, what `similarity` compares. Only
          retrieval checkpoints have the projection: for captioning checkpoints this key is absent.
        """
        return matching.embed_images(self, images)

    def embed_texts(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """Text features from the Q-Former reading the text alone, one row per text:

        - `text_embeds` (B, L, 768): every token's output, right-padded to the longest text;
        - `attention_mask` (B, L): 1 for tokens, 0 for padding;
        - `text_embeds_proj` (B, 256): the L2-normalised ITC projection of the [CLS] output.
        """
        return matching.embed_texts(self, texts)

    def embed_multimodal(
        self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
    ) -> Tensor:
        """Multimodal features (N, Q, 768): the query outputs of the Q-Former reading each image (cross-attention)
        and its text (self-attention) together, as LAVIS's extract_features(mode="multimodal"). Images and texts
        pair up as in `match`."""
        return matching.embed_multimodal(self, images, texts)


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> Blip2:
    """Load a BLIP-2 checkpoint: a local directory in the Hugging Face layout, or a Hub repo id.

    Captioning / VQA checkpoints (BLIP-2 with OPT or Flan-T5, InstructBLIP with Flan-T5 or Vicuna) and the
    image-text retrieval checkpoints (blip2-itm-vit-g: match, similarity, classify, embeddings).

    device: "cpu", "cuda", "cuda:1", ... (default: CUDA when available). dtype: float32 (default on CPU),
    float16 (default on GPU) or bfloat16. The Q-Former stays in float32, as in the reference; a Flan-T5
    language model asked for in float16 is kept in bfloat16, because T5 overflows in float16.

    quantize: None (float weights); "int8": the language model's Linears in int8 with one scale per output
    channel (on the CPU in float32 run by PyTorch's dynamic int8 kernel, which also rounds the activations:
    faster, not smaller; elsewhere weight-only, dequantized in the matmul); "int8-all": the vision tower and
    the Q-Former too; "int4": the language model, weight-only in groups of 128, CUDA only. The output head,
    the projection and the query tokens stay in float (see blip2.loading.quantize).
    """
    return Blip2(load_checkpoint(name_or_path, device, dtype, quantize=quantize))


def load_retrieval(directory: Path, device: torch.device, dtype: torch.dtype, name: str = "") -> Blip2:
    """Load a retrieval checkpoint directory (Hugging Face layout), refusing any other kind; `load` loads
    every kind."""
    if not is_retrieval(read_json(directory / "config.json")):
        raise CheckpointError(f"{directory} is not an image-text retrieval checkpoint")
    return Blip2(load_directory(directory, device, dtype, name))

"""Rows -> model inputs: the text of a batch laid out as each stage's objective reads it (pure functions of the
rows and a tokenizer), and the image embeddings, from a cache of the frozen vision tower or computed.

Stage 1: `[CLS] caption [SEP]`, right-padded (the Q-Former's BERT tokenizer), and an image id per row.
Stage 2, OPT (as LAVIS's Blip2OPT): `</s> prompt caption \\n`, right-padded, the loss on `caption \\n` (and on
`</s>` when there is no prompt, as LAVIS); VQA rows: the family's ask template around the question as the prompt
and the answer as the caption. Flan-T5 (as Blip2T5): the prompt `prompt </s>` to the encoder, `caption </s>`
as the decoder's target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..text import TextProcessor
from .data import Row
from .losses import IGNORE
from .objectives import LMBatch, TextBatch

OPT_END = "\n"  # LAVIS ends OPT targets with a newline, which the released OPT checkpoints stop at


def stage1_batch(
    rows: Sequence[Row], text: TextProcessor, image_ids: Sequence[int], max_length: int
) -> TextBatch:
    prompts = text.batch([row.caption or "" for row in rows], "right", max_length)
    return TextBatch(prompts.ids, prompts.mask, torch.tensor(list(image_ids), dtype=torch.long))


def prompt_and_target(row: Row, caption_prompt: str, ask_template: str | None) -> tuple[str, str]:
    """The prompt and the target text of a row: (caption prompt, caption), or (the question in the family's
    ask template, the answer)."""
    if row.caption is not None:
        return caption_prompt, row.caption
    question = row.question or ""
    return (ask_template.format(question) if ask_template else question), row.answer or ""


def decoder_only_batch(
    rows: Sequence[Row], text: TextProcessor, caption_prompt: str, ask_template: str | None, max_length: int
) -> LMBatch:
    """OPT: ids = prompt ids (with </s>) + target ids, right-padded; labels = the target ids (and </s> without
    a prompt), IGNORE elsewhere. Prompt and target are tokenized apart, so the prompt's tokens are the same as
    at inference whatever the target."""
    sequences, label_rows = [], []
    for row in rows:
        prompt, target = prompt_and_target(row, caption_prompt, ask_template)
        prompt_ids = text.encode(prompt)
        joiner = " " if prompt and not prompt.endswith(" ") else ""
        target_ids = text.tokenizer.encode(joiner + target + OPT_END, add_special_tokens=False).ids
        ids = (prompt_ids + target_ids)[:max_length]
        masked = len(prompt_ids) if prompt else 0
        sequences.append(ids)
        label_rows.append([IGNORE] * min(masked, len(ids)) + ids[masked:])
    return _right_padded(sequences, label_rows, text.pad_id)


def encoder_decoder_batch(
    rows: Sequence[Row], text: TextProcessor, caption_prompt: str, ask_template: str | None, max_length: int
) -> LMBatch:
    """Flan-T5: the prompts (encoder input) right-padded, and the targets as labels, IGNORE at padding."""
    pairs = [prompt_and_target(row, caption_prompt, ask_template) for row in rows]
    prompts = text.batch([p for p, _ in pairs], "right", max_length)
    targets = text.batch([t for _, t in pairs], "right", max_length)
    return LMBatch(prompts.ids, prompts.mask, targets.ids.masked_fill(targets.mask == 0, IGNORE))


def _right_padded(sequences: list[list[int]], label_rows: list[list[int]], pad_id: int | None) -> LMBatch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(sequences, label_rows)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return LMBatch(ids, mask, labels)

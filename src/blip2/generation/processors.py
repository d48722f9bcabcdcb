"""Logits processors as pure functions: float32 scores (N, V) and the token history (N, T) in, new scores out.

Each one does the same arithmetic as the transformers processor of the same purpose, so that decoding stays
token-identical; `process` applies the enabled ones in the order transformers' `_get_logits_processor` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip2.generation.options import GenerationOptions


def repetition_penalty(scores: Tensor, history: Tensor, penalty: float, skip: Tensor | None = None) -> Tensor:
    """Make every token already in `history` less likely (CTRL, arXiv:1909.05858): positive scores are divided
    by `penalty`, negative ones multiplied. `skip` (N,) ignores each row's first positions (its left padding)."""
    vocab = scores.shape[-1]
    if skip is not None:
        positions = torch.arange(history.shape[1], device=history.device)
        history = history.masked_fill(positions[None, :] < skip[:, None], vocab)
    # Ids past the vocab (and the skipped positions) land in a spare column that is dropped.
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, history.clamp(max=vocab), True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def no_repeat_ngram(scores: Tensor, history: Tensor, size: int) -> Tensor:
    """Forbid any token that would complete an n-gram of `size` tokens already present in `history`."""
    length = history.shape[1]
    if length < size:
        return scores
    vocab = scores.shape[-1]
    windows = history.unfold(1, size, 1)  # (N, W, size): every n-gram so far
    tail = history[:, length - size + 1 :]  # (N, size - 1): what the next token would extend
    repeats = (windows[:, :, :-1] == tail[:, None, :]).all(dim=-1)  # (N, W)
    # An n-gram whose head is the tail bans its last token; the others point at a spare column.
    banned_ids = torch.where(repeats, windows[:, :, -1].clamp(max=vocab), vocab)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, banned_ids, True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def forbid_eos(scores: Tensor, num_new: int, min_new_tokens: int, eos: Tensor) -> Tensor:
    """Set EOS (every id in `eos`) to -inf while fewer than `min_new_tokens` tokens have been generated."""
    if num_new >= min_new_tokens:
        return scores
    is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos.to(scores.device))
    return scores.masked_fill(is_eos, -float("inf"))


def temperature(scores: Tensor, value: float) -> Tensor:
    return scores / value


def top_k(scores: Tensor, k: int) -> Tensor:
    """Keep the `k` best tokens of each row (and any tied with the k-th), set the others to -inf."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k).values[:, -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p(scores: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of best tokens whose probability reaches `p` (at least one)."""
    ascending, order = torch.sort(scores, descending=False)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_below <= (1 - p)
    drop[:, -1] = False
    drop = drop.scatter(1, order, drop)  # back to vocabulary order
    return scores.masked_fill(drop, -float("inf"))


def process(
    scores: Tensor,
    history: Tensor,
    options: GenerationOptions,
    prompt_length: int,
    eos: Tensor,
    padding: Tensor | None = None,
) -> Tensor:
    """Apply the processors `options` enables, in transformers' order: penalties and bans first, then (when
    sampling) temperature, top-k, top-p. `history` (N, T) is the prompt plus what was generated, `padding` (N,)
    each row's number of left-padding positions."""
    if options.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, options.repetition_penalty, padding)
    if options.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, history, options.no_repeat_ngram_size)
    if options.min_new_tokens > 0:
        scores = forbid_eos(scores, history.shape[1] - prompt_length, options.min_new_tokens, eos)
    if options.do_sample:
        if options.temperature != 1.0:
            scores = temperature(scores, options.temperature)
        if options.top_k != 0:
            scores = top_k(scores, options.top_k)
        if options.top_p < 1.0:
            scores = top_p(scores, options.top_p)
    return scores

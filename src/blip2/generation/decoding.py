"""Decoding loops over a `Stepper`: greedy, sampling and beam search.

In the deterministic modes the tokens are identical to transformers 5.24's `generate`: the same processors in
the same order, the same tie-breaking ops (argmax, topk), and for beam search the same bookkeeping of finished
hypotheses, early-stop heuristic and final selection (`GenerationMixin._beam_search`).

Host syncs: the only value a loop reads back from the device while decoding is its stop flag ("has every
row / search ended?"), and it reads it every `check_every` steps. With 1 (the default) the loops stop
exactly where transformers stops, with as many model calls; on an accelerator a larger value lets the host
queue (or a CUDA graph replay) several steps without waiting for the device, at the cost of up to
`check_every - 1` steps run past the end. Those steps cannot change the output: finished greedy rows only
add padding, which is cut off at the step where everything had ended, and a beam search freezes its
finished hypotheses once its stop rule has held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2.errors import InputError
from blip2.generation.options import GenerationOptions
from blip2.generation.processors import process
from blip2.generation.steppers import Stepper

_EXCLUDED = -1.0e9  # the score transformers gives to beams that must not be chosen

# Called with each step's tokens (N * num_return_sequences,) in greedy and sampling decoding (finished rows
# get padding); beam search does not call it, as a later step can replace a beam's earlier tokens.
OnStep = Callable[[Tensor], None]


def generate(
    stepper: Stepper,
    history: Tensor,
    options: GenerationOptions,
    eos_token_id: int | list[int],
    pad_token_id: int,
    attention_mask: Tensor | None = None,
    check_every: int = 1,
    on_step: OnStep | None = None,
) -> Tensor:
    """Decode new tokens for the N rows of `stepper`; returns (N * num_return_sequences, L), new tokens only.

    `history` (N, T) is what transformers sees as `input_ids`: the prompt ids for a decoder-only model, the
    decoder start token (N, 1) for an encoder-decoder. Penalties and n-gram bans look at it and at the new
    tokens. `attention_mask` (N, T), if the prompts are left-padded, lets the repetition penalty skip the
    padding, as transformers does. Rows that stop early are padded as transformers pads them: with
    `pad_token_id` (greedy, sampling), or for beam search with `pad_token_id`, or EOS where that id is 0.
    `options` were checked when they were built. `check_every` (>= 1): how many steps between reads of
    the stop flag (see the module's docstring); it changes the number of model calls, never the tokens.
    `on_step` (greedy and sampling only) sees each step's tokens as they are chosen, for streaming.
    """
    assert isinstance(options, GenerationOptions), f"options must be GenerationOptions, not {type(options)}"
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise InputError(f"check_every must be an integer >= 1, got {check_every!r}")
    if history.dim() != 2 or history.shape[0] == 0:
        raise InputError(
            f"history must be a non-empty (N, T) tensor of token ids, got shape {tuple(history.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != history.shape:
        raise InputError(
            f"attention_mask {tuple(attention_mask.shape)} does not match history {tuple(history.shape)}"
        )
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if eos.numel() == 0:
        raise InputError("eos_token_id must name at least one token")
    logits = stepper.prefill(options.max_new_tokens)  # (N, V)
    if logits.shape[0] != history.shape[0]:
        raise InputError(f"the stepper has {logits.shape[0]} rows but history has {history.shape[0]}")
    # Work where the logits are; the output comes back there too.
    history, eos = history.to(logits.device), eos.to(logits.device)
    # Number of left-padding positions per row: transformers' `prompt_ignore_length`.
    padding = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1).to(logits.device)
    if options.do_sample and options.seed is None:
        check_every = 1  # steps past the end would draw from the global RNG, which the caller may reuse
    if options.is_beam_search:
        return _beam_search(stepper, logits, history, options, eos, pad_token_id, padding, check_every)
    return _greedy_or_sample(
        stepper, logits, history, options, eos, pad_token_id, padding, check_every, on_step
    )


def _stop_due(step: int, check_every: int, flag: Tensor) -> bool:
    """Read the device's stop flag on every `check_every`-th step, else go on unread."""
    return (step + 1) % check_every == 0 and _read_flag(flag)


def _read_flag(flag: Tensor) -> bool:
    """The loops' one host sync per check: wait for the device, read a bool ()."""
    return bool(flag)


def _expand(stepper: Stepper, logits: Tensor, tensors: list[Tensor | None], copies: int):
    """Repeat every row `copies` times, in the stepper and in `logits` and `tensors`: (N, ...) -> (N * copies, ...)."""
    if copies == 1:
        return logits, tensors
    rows = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(copies)
    stepper.select(rows)
    return logits[rows], [None if t is None else t[rows] for t in tensors]


def _greedy_or_sample(
    stepper: Stepper,
    logits: Tensor,
    history: Tensor,
    options: GenerationOptions,
    eos: Tensor,
    pad: int,
    padding: Tensor | None,
    check_every: int,
    on_step: OnStep | None = None,
) -> Tensor:
    prompt_length, max_new = history.shape[1], options.max_new_tokens
    logits, (history, padding) = _expand(stepper, logits, [history, padding], options.num_return_sequences)
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(options.seed)
    # (N, T + max_new): the prompt, then the new tokens written in place; the processors see the filled part.
    tokens = torch.cat([history, history.new_full((history.shape[0], max_new), pad)], dim=1)
    running = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    # Steps taken while some row was running: the number of new tokens transformers returns.
    length = torch.zeros((), dtype=torch.int64, device=tokens.device)
    for step in range(max_new):
        end = prompt_length + step
        scores = process(logits.float(), tokens[:, :end], options, prompt_length, eos, padding)
        if options.do_sample:
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        chosen = torch.where(running, chosen, pad)  # finished rows get padding
        tokens[:, end] = chosen
        length += running.any()
        running &= ~torch.isin(chosen, eos)
        if on_step is not None:
            on_step(chosen)
        if step == max_new - 1 or _stop_due(step, check_every, ~running.any()):
            break
        logits = stepper.step(chosen)
    return tokens[:, prompt_length : prompt_length + int(length)]


@dataclass
class _Beams:
    """Beam-search state of B inputs x K beams, as in transformers' `_beam_search`.

    Sequences hold the prompt and the tokens so far, (B, K, T + max_new_tokens), filled past their end."""

    running: Tensor  # (B, K, L) the live hypotheses
    running_scores: Tensor  # (B, K) their summed log-probabilities
    parent_rows: Tensor  # (B, K) the flat row (b * K + k) each live hypothesis grew from this step
    done: Tensor  # (B, K, L) the best finished hypotheses, best first
    done_scores: Tensor  # (B, K) their length-normalised scores
    done_lengths: Tensor  # (B, K) their number of generated tokens
    is_done: Tensor  # (B, K) whether a `done` slot holds a real finished hypothesis
    improvable: Tensor  # (B, 1) whether a live beam may still beat the finished ones


def _init_beams(history: Tensor, num_beams: int, max_length: int, fill: int) -> _Beams:
    batch, prompt_length = history.shape[0], history.shape[1]
    device = history.device
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.int64, device=device)
    running[:, :, :prompt_length] = history[:, None, :]
    # Only the first beam starts live, so the first step does not pick the same token K times.
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _EXCLUDED
    return _Beams(
        running=running,
        running_scores=running_scores,
        parent_rows=torch.zeros(batch, num_beams, dtype=torch.int64, device=device),
        done=running.clone(),
        done_scores=torch.full((batch, num_beams), _EXCLUDED, device=device),
        done_lengths=torch.zeros(batch, num_beams, dtype=torch.int64, device=device),
        is_done=torch.zeros(batch, num_beams, dtype=torch.bool, device=device),
        improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
    )


def _beam_search(
    stepper: Stepper,
    logits: Tensor,
    history: Tensor,
    options: GenerationOptions,
    eos: Tensor,
    pad: int,
    padding: Tensor | None,
    check_every: int,
) -> Tensor:
    batch, prompt_length = history.shape
    num_beams = options.num_beams
    max_length = prompt_length + options.max_new_tokens
    # transformers fills with `pad_token_id or eos[0]`, so a pad id of 0 reads as "no pad id".
    fill = pad if pad != 0 else int(eos[0])
    beams = _init_beams(history, num_beams, max_length, fill)
    logits, (padding,) = _expand(stepper, logits, [padding], num_beams)
    # Keep (EOS ids + 1) * K candidates, so that K of them are still live even if the best ones end.
    num_candidates = max(2, 1 + eos.numel()) * num_beams
    stopped = torch.zeros((), dtype=torch.bool, device=history.device)  # the stop rule has held
    for length in range(prompt_length, max_length):
        flat_history = beams.running[:, :, :length].reshape(batch * num_beams, length)
        log_probs = process(
            F.log_softmax(logits.float(), dim=-1), flat_history, options, prompt_length, eos, padding
        )
        scores, sequences, rows = _candidates(beams, log_probs, length, num_candidates)
        ended = torch.isin(sequences[:, :, length], eos) | (length + 1 >= max_length)  # (B, C)
        _keep_running(beams, scores, sequences, rows, ended)
        _keep_finished(beams, scores, sequences, ended, length + 1 - prompt_length, options, stopped)
        _update_improvable(beams, length + 1 - prompt_length, options)
        stopped = stopped | _stop_rule(beams, ended, options)
        if length == max_length - 1 or _stop_due(length - prompt_length, check_every, stopped):
            break
        stepper.select(beams.parent_rows.flatten())
        logits = stepper.step(beams.running[:, :, length].flatten())
    return _best_finished(beams, prompt_length, options.num_return_sequences)


def _candidates(beams: _Beams, log_probs: Tensor, length: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `count` best one-token continuations of each input's beams: their summed scores (B, C), sequences
    (B, C, L) and the flat row of the beam each grew from (B, C)."""
    batch, num_beams = beams.running_scores.shape
    totals = log_probs.reshape(batch, num_beams, -1) + beams.running_scores[:, :, None]
    vocab = totals.shape[-1]
    scores, flat_ids = torch.topk(totals.reshape(batch, -1), k=count)
    beam, token = flat_ids // vocab, flat_ids % vocab
    sequences = _gather(beams.running, beam)  # a new tensor: safe to write
    sequences[:, :, length] = token
    rows = beam + torch.arange(batch, device=beam.device)[:, None] * num_beams
    return scores, sequences, rows


def _keep_running(beams: _Beams, scores: Tensor, sequences: Tensor, rows: Tensor, ended: Tensor) -> None:
    """The K best candidates that did not end live on."""
    live_scores = scores + ended.to(torch.float32) * _EXCLUDED
    keep = torch.topk(live_scores, k=beams.running.shape[1]).indices
    beams.running = _gather(sequences, keep)
    beams.running_scores = _gather(live_scores, keep)
    beams.parent_rows = _gather(rows, keep)


def _keep_finished(
    beams: _Beams,
    scores: Tensor,
    sequences: Tensor,
    ended: Tensor,
    new_length: int,
    options: GenerationOptions,
    stopped: Tensor,
) -> None:
    """Merge the candidates that just ended among the K best into the finished set, keeping the K best by
    length-normalised score. The additions mirror transformers' float32 arithmetic, which decides ties.
    Once `stopped` (the stop rule held at an earlier step, not yet read by the host) the set is frozen."""
    num_beams = beams.running.shape[1]
    among_best = torch.arange(ended.shape[1], device=ended.device) < num_beams
    just_ended = ended & among_best[None, :]
    normalised = scores / (new_length**options.length_penalty)
    full = torch.all(beams.is_done, dim=-1, keepdim=True) & (options.early_stopping is True)
    normalised = normalised + full.to(torch.float32) * _EXCLUDED
    normalised = normalised + (~beams.improvable).to(torch.float32) * _EXCLUDED
    normalised = normalised + (~just_ended).to(torch.float32) * _EXCLUDED
    merged_scores = torch.cat([beams.done_scores, normalised], dim=1)
    best = torch.topk(merged_scores, k=num_beams).indices
    # Frozen: keep the K slots as they are (indices 0..K-1 of the merged set are the old ones).
    best = torch.where(stopped, torch.arange(num_beams, device=best.device), best)
    lengths = torch.full_like(ended, new_length, dtype=torch.int64)
    beams.done = _gather(torch.cat([beams.done, sequences], dim=1), best)
    beams.done_scores = _gather(merged_scores, best)
    beams.done_lengths = _gather(torch.cat([beams.done_lengths, lengths], dim=1), best)
    beams.is_done = _gather(torch.cat([beams.is_done, just_ended], dim=1), best)


def _update_improvable(beams: _Beams, generated: int, options: GenerationOptions) -> None:
    """Can the best live beam still beat the worst finished one? With early_stopping="never" and a positive
    length penalty, assume it could grow to max length; otherwise score it at its current length."""
    if options.early_stopping == "never" and options.length_penalty > 0.0:
        generated = options.max_new_tokens
    best_possible = beams.running_scores[:, :1] / (generated**options.length_penalty)
    worst_done = torch.where(beams.is_done, beams.done_scores.min(dim=1, keepdim=True).values, _EXCLUDED)
    beams.improvable = beams.improvable & torch.any(best_possible > worst_done, dim=-1, keepdim=True)


def _stop_rule(beams: _Beams, ended: Tensor, options: GenerationOptions) -> Tensor:
    """transformers' stop rule, as a device bool (): no live beam can improve any input's finished set,
    or with early_stopping=True every input has K finished hypotheses, or every candidate has ended."""
    stop = ~beams.improvable.any() | ended.all()
    if options.early_stopping is True:
        stop = stop | beams.is_done.all()
    return stop


def _best_finished(beams: _Beams, prompt_length: int, count: int) -> Tensor:
    """The `count` best finished hypotheses of each input, best first, cut to the longest: (B * count, L)."""
    done = beams.done[:, :count].flatten(0, 1)
    longest = int(beams.done_lengths[:, :count].max())
    return done[:, prompt_length : prompt_length + longest]


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """Pick along dim 1 (the beam/candidate dim) of a (B, K, ...) tensor with a (B, K') index."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)

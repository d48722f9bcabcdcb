"""Small pieces shared by the towers: activations, attention-mask and position helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (T5's gated-gelu, HF's `gelu_new`), written as the reference writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})") from None


def padding_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) 1/0 key mask -> additive (B, 1, 1, S) mask for scaled_dot_product_attention, or None.

    A (B, T, S) mask (one row of keys per query, e.g. training's image-grounded generation mask) gives
    (B, 1, T, S)."""
    if mask is None or bool(mask.all()):
        return None
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    additive = additive.masked_fill(mask == 0, torch.finfo(dtype).min)
    return additive[:, None] if mask.dim() == 3 else additive[:, None, None, :]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H*D) -> (B, H, T, D)"""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) 1/0 mask over every position -> (B, L) position ids.

    Positions count non-pad tokens only, so a left-padded row starts at 0 at its first real token;
    pad positions get -1 (OPT: a real but irrelevant row of its position table; a pad query attends only
    to itself, so what it gets changes no real token).
    """
    mask = attention_mask.long()
    return mask.cumsum(1) * mask - 1


def causal_mask(attention_mask: Tensor, queries: Tensor | None = None) -> Tensor:
    """(B, L) 1/0 key mask -> (B, 1, T, L) boolean mask (True = attend) for the queries at positions
    `queries` (T,), by default all L of them.

    A query sees the non-pad keys up to itself. It always sees itself too: that changes nothing for real
    tokens, and gives a left-padded row's pad queries something harmless to attend to instead of NaN.
    The decode path passes the key mask of the whole decode (prompt, then the new positions, all 1) and
    the step's `input_pos`: keys not written yet lie after the query, so they are masked out.
    """
    k_pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (L,)
    q_pos = (k_pos if queries is None else queries)[:, None]  # (T, 1)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, L)
    return allowed | (k_pos == q_pos)


def decoder_inputs(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) 1/0 mask -> the position ids (B, L) and attention mask (B, 1, L, L) of a decoder-only
    forward over the whole sequence, without a cache."""
    return position_ids(attention_mask), causal_mask(attention_mask)

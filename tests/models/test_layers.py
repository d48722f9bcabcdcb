"""The shared mask and position helpers of the decoder-only models."""

from __future__ import annotations

import torch

from blip2.models.layers import causal_mask, decoder_inputs, position_ids


def test_masks_and_positions_of_a_left_padded_row():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[-1, -1, 0, 1, 2]]
    allowed = causal_mask(mask)[0, 0].long()  # (L, L)
    # Pad queries see only themselves: CPU SDPA returns 0 for a fully masked row, CUDA kernels may give NaN.
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    positions, full = decoder_inputs(mask)
    assert torch.equal(positions, position_ids(mask)) and torch.equal(full, causal_mask(mask))


def test_rows_of_the_whole_length_mask_serve_a_shorter_prompt():
    """The stepper builds the mask once for prompt + new tokens; the prompt's own rows, cut to its keys,
    are the mask a prompt-only forward would build."""
    prompt = torch.tensor([[0, 1, 1], [1, 1, 1]])
    whole = torch.cat([prompt, torch.ones(2, 4, dtype=prompt.dtype)], dim=1)
    assert torch.equal(causal_mask(whole)[:, :, :3, :3], causal_mask(prompt))
    assert not causal_mask(whole)[:, :, :3, 3:].any()  # nor do they see any later position
    # a step's rows, by query position, are those rows of the whole mask
    at = torch.tensor([4])
    assert torch.equal(causal_mask(whole, at), causal_mask(whole)[:, :, at])
    assert torch.equal(position_ids(whole)[:, :3], position_ids(prompt))

"""The shared mask and position helpers of the decoder-only models."""

from __future__ import annotations

import torch

from blip2.models.layers import causal_mask, position_ids


def test_masks_and_positions_of_a_left_padded_row():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids(mask, 0).tolist() == [[-1, -1, 0, 1, 2]]
    assert position_ids(mask, 3).tolist() == [[1, 2]]
    allowed = causal_mask(mask, 0)[0, 0].long()  # (T, S)
    # Pad queries see only themselves: CPU SDPA returns 0 for a fully masked row, CUDA kernels may give NaN.
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert causal_mask(mask, 3)[0, 0].long().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]

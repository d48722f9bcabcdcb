"""Helpers of the training tests."""

from __future__ import annotations


def config(model, data, run_dir, stage, **overrides):
    """A small training config as a dict: a few steps, no progress bar."""
    return {
        "stage": stage,
        "model": str(model),
        "data": [str(d) for d in data] if isinstance(data, list) else str(data),
        "run_dir": str(run_dir),
        "steps": 3,
        "batch_size": 3,
        "lr": 1e-3,
        "checkpoint_every": 2,
        "progress": False,
        "threads": 1,
        **overrides,
    }

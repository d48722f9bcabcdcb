"""Tiny transformers models (the oracle) and test steppers that drive them for our decoding loops.

The steppers rerun the whole sequence every step, without a cache: these tests are about the loops, not a
cache. Default init gives near-uniform logits (every choice a near-tie), so the weights are scaled up until
the distributions are peaked but still varied.
"""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

VOCAB = 120
PAD = 1  # OPT's pad id; T5's is 0, which is also its decoder start token


def _widen(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


class OptStepper:
    """Decoder-only: the rows are left-padded prompts; each step appends one token and reruns everything."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.steps = 0

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, attention_mask=self.mask).logits[:, -1].float()

    def prefill(self, max_new_tokens: int = 1) -> torch.Tensor:
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        return self._logits()

    def select(self, index: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[index], self.mask[index]


class T5Stepper:
    """Encoder-decoder: encode once; the decoder history starts with the decoder start token."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.mask = model, attention_mask
        with torch.no_grad():
            self.encoded = model.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        start = model.generation_config.decoder_start_token_id
        self.ids = torch.full((input_ids.shape[0], 1), start, dtype=torch.long)
        self.steps = 0

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        out = self.model(
            encoder_outputs=(self.encoded,), attention_mask=self.mask, decoder_input_ids=self.ids
        )
        return out.logits[:, -1].float()

    def prefill(self, max_new_tokens: int = 1) -> torch.Tensor:
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self._logits()

    def select(self, index: torch.Tensor) -> None:
        self.encoded, self.mask, self.ids = self.encoded[index], self.mask[index], self.ids[index]


def _prompts(lengths: list[int], width: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded to `width`: ids and attention mask (N, width)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = pad
        mask[row, : width - length] = 0
    return ids, mask


class Case:
    """One model, one batch of prompts, and how to run both decoders on it."""

    def __init__(self, name, model, stepper_class, ids, mask, eos, pad):
        self.name, self.model, self.stepper_class = name, model, stepper_class
        self.ids, self.mask, self.eos, self.pad = ids, mask, eos, pad

    def subset(self, rows: list[int]) -> Case:
        return Case(
            self.name, self.model, self.stepper_class, self.ids[rows], self.mask[rows], self.eos, self.pad
        )

    def stepper(self):
        return self.stepper_class(self.model, self.ids, self.mask)

    @property
    def history(self) -> torch.Tensor:
        """What transformers' generate sees as input_ids."""
        if self.stepper_class is OptStepper:
            return self.ids
        return torch.full((self.ids.shape[0], 1), self.model.generation_config.decoder_start_token_id)

    def reference(self, **kwargs) -> torch.Tensor:
        """transformers' generate, with the prompt (or decoder start token) stripped."""
        kwargs = {"eos_token_id": self.eos, "pad_token_id": self.pad} | kwargs
        with torch.no_grad():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, **kwargs)
        return out[:, self.history.shape[1] :]


@pytest.fixture(scope="session")
def opt_case() -> Case:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    )
    model = _widen(OPTForCausalLM(config), 10.0)
    ids, mask = _prompts([7, 5, 3, 6, 4], width=7, pad=PAD, seed=1)
    # eos 75 is a token this model produces often, so some rows end early and others run to the limit.
    return Case("opt", model, OptStepper, ids, mask, eos=75, pad=PAD)


@pytest.fixture(scope="session")
def t5_case() -> Case:
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = _widen(T5ForConditionalGeneration(config), 3.0)
    model.generation_config.decoder_start_token_id = 0  # T5 starts decoding from its pad token
    ids, mask = _prompts([6, 4, 6, 2], width=6, pad=0, seed=2)
    # eos 11 is frequent here; pad 0 also makes beam search pad with eos, as transformers does.
    return Case("t5", model, T5Stepper, ids, mask, eos=11, pad=0)


@pytest.fixture(params=["opt", "t5"])
def case(request) -> Case:
    return request.getfixturevalue(f"{request.param}_case")

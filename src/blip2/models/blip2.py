"""BLIP-2 wired together: vision tower -> Q-Former (learned queries) -> projection -> language model.

Pure modules: no files, tokenizers or generation policy here. Parameter names follow the Hugging Face
checkpoint layout (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, `language_model.*`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Blip2Config, OPTConfig, T5Config
from .qformer import QFormer
from .vision import VisionModel


def build_language_model(config: OPTConfig | T5Config) -> nn.Module:
    if isinstance(config, T5Config):
        from .t5 import T5ForConditionalGeneration

        return T5ForConditionalGeneration(config)
    from .opt import OPTForCausalLM

    return OPTForCausalLM(config)


class Blip2ForConditionalGeneration(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        q = config.qformer
        self.vision_model = VisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q)
        self.language_projection = nn.Linear(q.hidden_size, _lm_width(config.text))
        self.language_model = build_language_model(config.text)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> image embeddings (B, 257, 1408) in the vision tower's dtype."""
        return self.vision_model(pixels)

    def query(self, image_embeds: Tensor) -> Tensor:
        """Image embeddings -> Q-Former query outputs (B, 32, 768), float32."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds, num_queries=queries.shape[1])

    def project(self, query_output: Tensor) -> Tensor:
        """Q-Former outputs -> language-model input embeddings (B, 32, D), in the projection's dtype."""
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def image_prefix(self, pixels: Tensor) -> Tensor:
        """pixels -> the soft prompt the language model reads before the text, (B, 32, D)."""
        return self.project(self.query(self.encode_images(pixels)))


def _lm_width(text: OPTConfig | T5Config) -> int:
    return text.d_model if isinstance(text, T5Config) else text.hidden_size

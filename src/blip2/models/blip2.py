"""BLIP-2 wired together: vision tower -> Q-Former (learned queries) -> projection -> language model.

InstructBLIP is the same with one difference: the instruction is also read by the Q-Former (its tokens
follow the queries in self-attention), so the queries extract what the instruction asks about.

Pure modules: no files, tokenizers or generation policy here. Parameter names follow the Hugging Face
checkpoint layout (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, `language_model.*`;
InstructBLIP's `qformer.embeddings.*` are renamed to `embeddings.*` / `qformer.layernorm` by the loader).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import Blip2Config
from .qformer import QFormer, TextEmbeddings
from .registry import family
from .vision import VisionModel


class Blip2Base(nn.Module):
    """The part every BLIP-2 model shares: the vision tower, the learned query tokens and the Q-Former, plus
    the Q-Former's text embeddings when it reads text (retrieval, InstructBLIP)."""

    head_weight: str  # a weight of the heads on top of the Q-Former, which all share its dtype

    def __init__(self, config: Blip2Config, reads_text: bool):
        super().__init__()
        self.config = config
        q = config.qformer
        self.vision_model = VisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q, text_ffn=reads_text or q.use_qformer_text_input)
        if reads_text:
            self.embeddings = TextEmbeddings(q)
        self.head_dtype = torch.float32  # the dtype the heads compute in (see set_compute_dtypes)

    def set_compute_dtypes(self, plan: Callable[[str], torch.dtype]) -> None:
        """Record the dtype each part computes in, from the loader's plan (parameter name -> dtype), once the
        weights are assigned: the parts cast their inputs to it instead of reading some weight's dtype, which a
        quantized Linear does not give."""
        self.vision_model.dtype = plan("vision_model.embeddings.patch_embedding.weight")
        self.qformer.dtype = plan("qformer.layernorm.weight")
        self.head_dtype = plan(self.head_weight)

    @property
    def vision_dtype(self) -> torch.dtype:
        """The dtype the vision tower computes in: that of the pixels it is given."""
        return self.vision_model.dtype

    def encode_images(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> image embeddings (B, 257, 1408) in the vision tower's dtype."""
        return self.vision_model(pixels)

    def query(
        self, image_embeds: Tensor, text_ids: Tensor | None = None, text_mask: Tensor | None = None
    ) -> Tensor:
        """Image embeddings (B, 257, C) [+ text ids and mask (B, L)] -> query outputs (B, Q, 768).

        With text, the queries read it in self-attention while they cross-attend to the image: the
        instruction of InstructBLIP, or the text of an ITM pair (LAVIS's "multimodal" features).
        """
        b, q = image_embeds.shape[0], self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        if text_ids is None:
            return self.qformer(queries, image_embeds, num_queries=q)
        assert text_mask is not None, "text_ids come with their text_mask"
        text = self.embeddings(text_ids)  # (B, L, 768)
        # As the reference: the queries join the text in the embeddings' dtype (float16 rounds them there).
        x = torch.cat([queries.to(text.dtype), text], dim=1)  # (B, Q + L, 768)
        mask = torch.cat([text_mask.new_ones(b, q), text_mask], dim=1)
        return self.qformer(x, image_embeds, num_queries=q, attention_mask=mask)[:, :q]


class Blip2ForConditionalGeneration(Blip2Base):
    head_weight = "language_projection.weight"

    def __init__(self, config: Blip2Config):
        super().__init__(config, reads_text=config.model_type == "instructblip")
        lm = family(config.text)
        self.language_projection = nn.Linear(config.qformer.hidden_size, lm.width(config.text))
        self.language_model = lm.model_class(config.text)

    def project(self, query_output: Tensor) -> Tensor:
        """Q-Former outputs -> language-model input embeddings (B, 32, D), in the projection's dtype."""
        return self.language_projection(query_output.to(self.head_dtype))

    def image_prefix(self, pixels: Tensor) -> Tensor:
        """pixels -> the soft prompt the language model reads before the text, (B, 32, D)."""
        return self.project(self.query(self.encode_images(pixels)))

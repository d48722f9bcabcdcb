"""The Q-Former: a BERT-style (post-LN) transformer whose learned query tokens read the image.

Queries attend to each other (and to text tokens, when text is given) in self-attention; every
`cross_attention_frequency`-th layer they also attend to the image embeddings. Query positions have their
own feed-forward (`intermediate_query` / `output_query`); text positions use `intermediate` / `output`.
The reference keeps the Q-Former in float32 whatever the rest of the model's dtype. Parameter names follow
the Hugging Face checkpoint layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QFormerConfig
from .layers import activation, merge_heads, padding_mask, split_heads


class MultiHeadAttention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q = split_heads(self.query(x), self.num_heads)
        k = split_heads(self.key(context), self.num_heads)
        v = split_heads(self.value(context), self.num_heads)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class AddNorm(nn.Module):
    """BERT's post-LN residual: LayerNorm(dense(y) + x). (`BertSelfOutput` / `BertOutput`.)"""

    def __init__(self, in_width: int, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(y) + x)


class Attention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = MultiHeadAttention(config, is_cross_attention)
        self.output = AddNorm(config.hidden_size, config)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, index: int, text_ffn: bool):
        super().__init__()
        self.attention = Attention(config)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(config, is_cross_attention=True)
        if text_ffn:
            self.intermediate = Intermediate(config)
            self.output = AddNorm(config.intermediate_size, config)
        self.intermediate_query = Intermediate(config)
        self.output_query = AddNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, mask: Tensor | None, image: Tensor | None, num_queries: int) -> Tensor:
        x = self.attention(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries > 0:
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("image embeddings are required by the Q-Former's cross-attention layers")
                queries = self.crossattention(queries, image, None)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig, text_ffn: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, text_ffn) for i in range(config.num_hidden_layers))


class TextEmbeddings(nn.Module):
    """Token ids (B, L) -> word + position embeddings (B, L, 768), for text read by the Q-Former (ITC, ITM).

    No LayerNorm here: the Q-Former's `layernorm` normalises queries and text together. Positions count
    from 0 at the first text token (the queries take none) and are made on the fly, not kept as a buffer.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(positions)[None]


class QFormer(nn.Module):
    """(query tokens [+ text embeddings], image embeddings) -> hidden states (B, Q [+ L], 768).

    `embeddings` are the already-embedded inputs: the query tokens, optionally followed by word + position
    embeddings of text. `attention_mask` (B, Q + L) of 1/0 covers both; None means attend everywhere. A
    (B, Q + L, Q + L) mask says which keys each position sees (training's image-grounded generation).
    """

    def __init__(self, config: QFormerConfig, text_ffn: bool | None = None):
        super().__init__()
        self.config = config
        text_ffn = config.use_qformer_text_input if text_ffn is None else text_ffn
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = QFormerEncoder(config, text_ffn)
        # The dtype it computes in, set by the loader: float32 as the reference keeps it (InstructBLIP: the
        # requested dtype). Its inputs are cast to it.
        self.dtype = torch.float32

    def forward(
        self,
        embeddings: Tensor,
        image: Tensor | None,
        num_queries: int,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        dtype = self.dtype
        x = self.layernorm(embeddings.to(dtype))
        image = image.to(dtype) if image is not None else None
        mask = padding_mask(attention_mask, dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image, num_queries)
        return x

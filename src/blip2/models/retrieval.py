"""BLIP-2's first-stage model for image-text retrieval: ITC (contrastive similarity) and ITM (matching).

The vision tower and the learned queries read the image as in captioning; the Q-Former also reads text, alone
(unimodal: its [CLS] output, projected, is the text embedding for ITC) or after the queries, which then see the
text in self-attention and the image in cross-attention (multimodal: the ITM head reads the query outputs).
Parameter names follow the Hugging Face checkpoint layout of `Blip2ForImageTextRetrieval` (`vision_model.*`,
`query_tokens`, `embeddings.*`, `qformer.*`, `vision_projection.*`, `text_projection.*`, `itm_head.*`);
`Salesforce/blip2-itm-vit-g` and `-coco` have no language model.

Text ids here are text only ([CLS] text [SEP], right-padded): no image placeholders, whatever the config's
`image_token_index` says (the reference drops the first `num_query_tokens` ids when it is set, expecting its
processor to have put placeholders there).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Blip2Config
from .blip2 import Blip2Base


class Blip2ForImageTextRetrieval(Blip2Base):
    head_weight = "itm_head.weight"  # and the ITC projections

    def __init__(self, config: Blip2Config):
        super().__init__(config, reads_text=True)
        q = config.qformer
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)

    # -- image ----------------------------------------------------------------------------------------------
    def image_features(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> image features (B, Q, 768)."""
        return self.query(self.encode_images(pixels))

    def project_images(self, image_features: Tensor) -> Tensor:
        """Image features (B, Q, 768) -> L2-normalised ITC embeddings (B, Q, 256), one per query."""
        return F.normalize(self.vision_projection(image_features.to(self.head_dtype)), dim=-1)

    # -- text -----------------------------------------------------------------------------------------------
    def text_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Text ids and 1/0 mask (B, L) -> Q-Former text outputs (B, L, 768), text alone (no queries, no image)."""
        return self.qformer(self.embeddings(ids), None, num_queries=0, attention_mask=mask)

    def project_texts(self, text_features: Tensor) -> Tensor:
        """Text features (B, L, 768) -> the L2-normalised ITC embedding of the [CLS] position (B, 256)."""
        cls = text_features[:, 0].to(self.head_dtype)
        return F.normalize(self.text_projection(cls), dim=-1)

    # -- image and text together ----------------------------------------------------------------------------
    def multimodal_features(self, image_embeds: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Aligned rows of image embeddings (B, 257, 1408) and text (B, L) -> query outputs (B, Q, 768) of the
        Q-Former reading queries + text, queries cross-attending to the image (LAVIS's "multimodal" features)."""
        return self.query(image_embeds, ids, mask)

    def itm_logits(self, multimodal: Tensor) -> Tensor:
        """Multimodal features (B, Q, 768) -> ITM logits (B, 2), [no match, match]: the head's mean over queries."""
        return self.itm_head(multimodal.to(self.head_dtype)).mean(dim=1)


def similarity(image_proj: Tensor, text_proj: Tensor) -> Tensor:
    """ITC similarity: (I, Q, 256) and (T, 256), both normalised -> (I, T), the best cosine over the queries."""
    return (image_proj @ text_proj.to(image_proj.dtype).T).amax(dim=1)  # (I, Q, T) -> (I, T)

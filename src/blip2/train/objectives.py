"""The two training objectives as modules over our models: they hold what training adds (stage 1's ITG head
and ITC temperature) and turn a batch into its losses (see losses.py for the math).

Stage 1 runs on `Blip2ForImageTextRetrieval`; the ITG head (LAVIS's `cls.predictions`: dense + GELU +
LayerNorm, then the Q-Former word embeddings as the decoder, plus a bias) is not part of the Hugging Face
checkpoint, it lives in the training state. Stage 2 runs on `Blip2ForConditionalGeneration` with an OPT
(decoder-only) or Flan-T5 (encoder-decoder) language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QFormerConfig
from ..models.blip2 import Blip2ForConditionalGeneration
from ..models.layers import activation, decoder_inputs
from ..models.retrieval import Blip2ForImageTextRetrieval
from ..models.t5 import T5ForConditionalGeneration
from . import losses

TEMPERATURE_INIT = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)


class ITGHead(nn.Module):
    """Q-Former text states (B, L, H) -> vocabulary logits (B, L, V), the decoder tied to the word embeddings."""

    def __init__(self, config: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = [
            word_embeddings
        ]  # a list: not a submodule, so not a second owner of its weight

    def forward(self, hidden: Tensor) -> Tensor:
        x = self.LayerNorm(self.act(self.dense(hidden)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)


@dataclass
class TextBatch:
    """Stage 1 text: [CLS] text [SEP] ids and 1/0 mask (B, L), right-padded; image ids (B,) (equal ids: the
    same image, never drawn as each other's negative)."""

    ids: Tensor
    mask: Tensor
    image_ids: Tensor


class Stage1Objective(nn.Module):
    """ITC + ITM + ITG on a retrieval model (LAVIS's `Blip2Qformer.forward`)."""

    def __init__(self, model: Blip2ForImageTextRetrieval, bos_id: int, init_std: float = 0.02):
        super().__init__()
        self.model = model
        self.bos_id = bos_id
        q = model.config.qformer
        self.itg_head = ITGHead(q, model.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        device = model.query_tokens.device
        self.to(device)
        with torch.no_grad():
            self.itg_head.dense.weight.normal_(0.0, init_std)
            self.itg_head.dense.bias.zero_()

    def forward(
        self, image_embeds: Tensor, text: TextBatch, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Image embeddings (B, N, C) of the vision tower and the batch's text -> losses itc, itm, itg, loss."""
        m = self.model
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        queries = m.query(image_embeds)  # (B, Q, H)
        image_feats = m.project_images(queries)  # (B, Q, E)
        text_feats = m.project_texts(m.text_features(text.ids, text.mask))  # (B, E)
        sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feats.to(image_feats.dtype), self.temp)
        itc = losses.itc_loss(sim_i2t.float(), sim_t2i.float(), text.image_ids)

        neg_images, neg_texts = losses.hard_negatives(sim_i2t, sim_t2i, text.image_ids, generator)
        ids = torch.cat([text.ids, text.ids, text.ids[neg_texts]])  # (3B, L): pos, pos, neg
        mask = torch.cat([text.mask, text.mask, text.mask[neg_texts]])
        images = torch.cat([image_embeds, image_embeds[neg_images], image_embeds])  # pos, neg, pos
        itm = losses.itm_loss(m.itm_logits(m.multimodal_features(images, ids, mask)))

        itg = self.itg_loss(image_embeds, text)
        return {"loss": itc + itm + itg, "itc": itc, "itm": itm, "itg": itg}

    def itg_loss(self, image_embeds: Tensor, text: TextBatch) -> Tensor:
        """Image-grounded generation: [DEC] replaces [CLS]; the text reads the queries (which read the image)
        through the multimodal causal mask."""
        m = self.model
        num_queries = m.query_tokens.shape[1]
        decoder_ids = text.ids.clone()
        decoder_ids[:, 0] = self.bos_id
        labels = losses.itg_labels(decoder_ids, text.mask)
        b = text.ids.shape[0]
        embeds = m.embeddings(decoder_ids)  # (B, L, H)
        x = torch.cat([m.query_tokens.expand(b, -1, -1).to(embeds.dtype), embeds], dim=1)
        mask = losses.itg_attention_mask(num_queries, text.mask)  # (B, Q + L, Q + L)
        hidden = m.qformer(x, image_embeds, num_queries=num_queries, attention_mask=mask)[:, num_queries:]
        return losses.next_token_loss(self.itg_head(hidden), labels, losses.ITG_SMOOTHING)


@dataclass
class LMBatch:
    """Stage 2 text. Decoder-only (OPT): `ids`/`mask` (B, L) are prompt + target, right-padded, and `labels`
    (B, L) the target ids (IGNORE elsewhere). Encoder-decoder (T5): `ids`/`mask` the encoder prompt, `labels`
    (B, T) the target ids, IGNORE at padding."""

    ids: Tensor
    mask: Tensor
    labels: Tensor


class Stage2Objective(nn.Module):
    """The language-model loss through the language model, the image as its soft prompt (LAVIS's
    `Blip2OPT.forward` / `Blip2T5.forward`)."""

    def __init__(self, model: Blip2ForConditionalGeneration, is_encoder_decoder: bool):
        super().__init__()
        self.model = model
        self.is_encoder_decoder = is_encoder_decoder

    def forward(
        self, image_embeds: Tensor, text: LMBatch, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        prefix = self.model.project(self.model.query(image_embeds))  # (B, Q, D)
        loss = (
            self.encoder_decoder_loss(prefix, text)
            if self.is_encoder_decoder
            else self.decoder_loss(prefix, text)
        )
        return {"loss": loss, "lm": loss}

    def decoder_loss(self, prefix: Tensor, text: LMBatch) -> Tensor:
        """OPT: [query prefix | prompt + target | pad], loss on the target tokens."""
        lm = self.model.language_model
        embeds = lm.embed(text.ids)
        b, q = prefix.shape[:2]
        x = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)  # (B, Q + L, D)
        mask = torch.cat([text.mask.new_ones(b, q), text.mask], dim=1)
        positions, attention = decoder_inputs(mask)
        logits = lm(x, positions, attention)  # (B, Q + L, V)
        labels = torch.cat([text.labels.new_full((b, q), losses.IGNORE), text.labels], dim=1)
        return losses.next_token_loss(logits, labels)

    def encoder_decoder_loss(self, prefix: Tensor, text: LMBatch) -> Tensor:
        """Flan-T5: encoder [query prefix | prompt], decoder the target (shifted right), loss on the target."""
        lm = cast(T5ForConditionalGeneration, self.model.language_model)
        cfg = lm.config
        embeds = lm.embed(text.ids)
        b, q = prefix.shape[:2]
        x = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([text.mask.new_ones(b, q), text.mask], dim=1)
        encoded = lm.encode(x, mask)
        decoder_ids = losses.shift_right(text.labels, cfg.decoder_start_token_id, cfg.pad_token_id or 0)
        length = decoder_ids.shape[1]
        logits = lm.decode(
            decoder_ids, encoded, lm.decoder_self_bias(length), lm.decoder_cross_bias(mask, encoded.dtype)
        )
        return losses.token_loss(logits, text.labels)

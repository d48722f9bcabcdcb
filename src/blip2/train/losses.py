"""The training losses of BLIP-2 as pure functions of tensors, reimplemented from the paper and LAVIS's
`blip2_qformer.py` / `Qformer.py` / `blip2_opt.py` / `blip2_t5.py` (single process: no gathering across GPUs).

Stage 1 (Q-Former representation learning):
- ITC: the similarity of an image and a text is the best cosine over the image's query embeddings and the
  text's [CLS] embedding, divided by a learned temperature; cross-entropy both ways with LAVIS's targets:
  0.9 spread over the pairs of the same image plus 0.1 uniform (label smoothing 0.1 when images are distinct).
- ITM: hard negatives drawn from the ITC softmax (pairs of the same image excluded), 3B pairs (positives,
  negative images, negative texts), cross-entropy over [no match, match].
- ITG: next-token prediction by the Q-Former's text positions, which see every query and the text before
  them, while the queries see only queries; label smoothing 0.1.

Stage 2: next-token cross-entropy of the language model on the target tokens only (no smoothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of positions without a loss (as transformers and LAVIS)
ITC_SMOOTHING = 0.1
ITG_SMOOTHING = 0.1
MASKED_SIMILARITY = -10000.0  # LAVIS's fill for pairs that may not be drawn as negatives


def itc_similarities(image_feats: Tensor, text_feats: Tensor, temp: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised image query embeddings (B, Q, E) and text embeddings (B, E) -> (sim_i2t, sim_t2i), each
    (B, B): the best query's cosine, divided by the temperature."""
    sim = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)  # (B_img, B_txt)
    sim_i2t = sim / temp
    return sim_i2t, sim_i2t.T


def same_image(image_ids: Tensor) -> Tensor:
    """(B,) image ids -> (B, B) bool, True where two rows show the same image."""
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor) -> Tensor:
    """Contrastive loss with LAVIS's targets: every pair of the same image is a positive, weight 0.9 shared
    among them, plus 0.1 spread over all B (with distinct images: cross-entropy with label smoothing 0.1)."""
    positives = same_image(image_ids).to(sim_i2t.dtype)  # symmetric
    targets = positives / positives.sum(dim=1, keepdim=True)
    targets = (1 - ITC_SMOOTHING) * targets + ITC_SMOOTHING / targets.shape[1]
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """For each text a negative image, and for each image a negative text, drawn with the probabilities of
    the ITC softmax (harder negatives more often); pairs of the same image are never drawn (unless a row has
    nothing else). Returns (negative image index per text (B,), negative text index per image (B,))."""
    with torch.no_grad():
        mask = same_image(image_ids)
        weights_t2i = F.softmax(sim_t2i.float().masked_fill(mask, MASKED_SIMILARITY), dim=1)
        weights_i2t = F.softmax(sim_i2t.float().masked_fill(mask, MASKED_SIMILARITY), dim=1)
        # one draw per row; the generator lives on the CPU, so draw there
        neg_images = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).squeeze(1)
        neg_texts = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).squeeze(1)
    return neg_images.to(sim_i2t.device), neg_texts.to(sim_i2t.device)


def itm_labels(batch: int, device: torch.device | None = None) -> Tensor:
    """Labels of the 3B ITM pairs in the order (positives, negative images, negative texts): 1, then 0."""
    return torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]).to(
        device
    )


def itm_loss(logits: Tensor) -> Tensor:
    """ITM logits (3B, 2) of (positives, negative images, negative texts) -> cross-entropy."""
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


def itg_attention_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """The paper's multimodal causal mask for image-grounded text generation: (B, L) 1/0 text mask ->
    (B, Q + L, Q + L) 1/0, row = position, column = key. Queries see all queries (never text); a text
    position sees all queries and the non-pad text up to itself."""
    b, length = text_mask.shape
    n = num_queries + length
    keys_ok = torch.cat([text_mask.new_ones(b, num_queries), text_mask], dim=1).bool()  # (B, N)
    pos = torch.arange(n, device=text_mask.device)
    is_query = pos < num_queries
    causal = pos[None, :] <= pos[:, None]  # (N, N)
    # a query row: query columns only; a text row: query columns and earlier text columns
    allowed = torch.where(is_query[:, None], is_query[None, :], causal)  # (N, N)
    return (allowed[None] & keys_ok[:, None, :]).long()


def itg_labels(decoder_ids: Tensor, text_mask: Tensor) -> Tensor:
    """ITG labels: the decoder ids ([DEC] text [SEP]) with padding ignored (LAVIS: pad -> -100)."""
    return decoder_ids.masked_fill(text_mask == 0, IGNORE)


def next_token_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the prediction at each position for the label of the next position, labels IGNORE
    excluded, mean over the rest: logits (B, T, V), labels (B, T)."""
    return token_loss(logits[:, :-1], labels[:, 1:], label_smoothing)


def token_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T) at the same positions, IGNORE excluded, mean."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """T5's decoder inputs from its labels (B, T): the start token, then the labels but the last, IGNORE as pad."""
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start_id), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE, pad_id)

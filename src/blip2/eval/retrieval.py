"""Image-text retrieval recall (R@1/5/10, image->text and text->image) with ITC alone and with ITC + ITM
re-ranking of the top k, as LAVIS evaluates BLIP-2 (`blip2_qformer.compute_sim_matrix` and
`tasks/retrieval.py`'s `_report_metrics`).

Texts are first normalised as LAVIS's caption processor does (`lavis_text`). ITC: every image against every text, the best cosine over the 32 query tokens (`Blip2.similarity`).
Re-ranking (LAVIS): for each image, its k best texts by ITC get the score ITM + ITC, where ITM is the ITM
head's match logit (class 1, averaged over the queries: LAVIS's `compute_itm`, not a probability); the other
texts drop below them (LAVIS writes -100, we write -inf). The same for each text and its k best images. The
paper (and LAVIS) use k = 128.

Ranks: LAVIS orders with numpy's argsort, which breaks ties in no stated way. We break them against the
query: a ground truth ties with an item only to its loss (rank = number of other items scoring at least
as much as the best ground truth), so a model that scores everything alike gets R@K near 0, not near 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RECALL_AT = (1, 5, 10)
MAX_WORDS = 50  # LAVIS's caption processor keeps the first 50 words


def lavis_text(caption: str, max_words: int = MAX_WORDS) -> str:
    """A caption as LAVIS's retrieval evaluation reads it (`BlipCaptionProcessor.pre_caption`): lower-cased,
    the marks . ! " ( ) * # : ; ~ made spaces, spaces collapsed, at most `max_words` words."""
    text = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", caption.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def ranks(scores: Tensor, truth: Sequence[Sequence[int]]) -> list[int]:
    """For each query (row of `scores`, (Q, N)), the 0-based rank of its best ground-truth item (indices
    in `truth[q]`), ties counted against it (see the module doc)."""
    out = []
    for row, relevant in zip(scores, truth):
        mask = torch.zeros(row.shape[0], dtype=torch.bool)
        mask[list(relevant)] = True
        best = row[mask].max()
        out.append(int((row[~mask] >= best).sum()))
    return out


def recall(rank_list: Sequence[int], at: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """R@K for each K: the fraction of queries whose best ground truth has rank < K."""
    return {k: sum(r < k for r in rank_list) / len(rank_list) for k in at}


def top_k(scores: Tensor, k: int) -> Tensor:
    """The indices (Q, k') of the k best items per row (k' = min(k, N))."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def rerank(scores: Tensor, top: Tensor, itm: Tensor) -> Tensor:
    """LAVIS's re-ranked matrix: scores[q, top[q, j]] + itm[q, j] on each row's top k, -inf elsewhere."""
    out = torch.full_like(scores, float("-inf"))
    out.scatter_(1, top, scores.gather(1, top) + itm)
    return out


def retrieval_metrics(
    i2t: Tensor, t2i: Tensor, image_texts: Sequence[Sequence[int]], text_image: Sequence[int]
) -> dict[str, float]:
    """R@1/5/10 both ways and their mean, in [0, 1]: `i2t` (I, T), `t2i` (T, I); `image_texts[i]` the
    texts of image i, `text_image[t]` the image of text t."""
    out = {f"i2t_R@{k}": v for k, v in recall(ranks(i2t, image_texts)).items()}
    out |= {f"t2i_R@{k}": v for k, v in recall(ranks(t2i, [[i] for i in text_image])).items()}
    out["mean"] = sum(out.values()) / len(out)
    return out


def rerank_both(itc: Tensor, k: int, itm_logits: Callable[[int, list[int]], Tensor]) -> tuple[Tensor, Tensor]:
    """The re-ranked i2t (I, T) and t2i (T, I) matrices from the ITC matrix (I, T). `itm_logits(i, texts)`
    gives image i's ITM match logits with each of `texts`: it is called once per image, for the union of
    the image's top-k texts and the texts that have the image in their top k (each image is read once)."""
    i2t_top, t2i_top = top_k(itc, k), top_k(itc.T, k)  # (I, k), (T, k)
    wanted: list[set[int]] = [set(row) for row in i2t_top.tolist()]
    for text, images in enumerate(t2i_top.tolist()):
        for image in images:
            wanted[image].add(text)
    logit: dict[tuple[int, int], float] = {}
    for image, texts in enumerate(wanted):
        ordered = sorted(texts)
        for text, value in zip(ordered, itm_logits(image, ordered).tolist()):
            logit[image, text] = value
    i2t_itm = torch.tensor([[logit[i, t] for t in row] for i, row in enumerate(i2t_top.tolist())])
    t2i_itm = torch.tensor([[logit[i, t] for i in row] for t, row in enumerate(t2i_top.tolist())])
    return rerank(itc, i2t_top, i2t_itm.reshape(i2t_top.shape)), rerank(
        itc.T, t2i_top, t2i_itm.reshape(t2i_top.shape)
    )

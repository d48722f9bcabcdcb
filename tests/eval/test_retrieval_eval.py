"""Retrieval recall: the rank and recall functions on hand-made matrices (ties included), and the whole
evaluation on a tiny retrieval checkpoint against a brute-force computation with transformers' model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blip2.eval.retrieval import lavis_text, ranks, recall, rerank, rerank_both, retrieval_metrics, top_k
from blip2.eval.run import evaluate_retrieval, itc_matrix, itm_logits
from blip2.tasks.api import load_retrieval


def test_ranks_count_ties_against_the_query():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # truth 0 is first
            [0.5, 0.5, 0.1],  # truth 1 ties with item 0: rank 1, not 0
            [0.2, 0.2, 0.2],  # everything alike: truth 2 is last
            [0.1, 0.7, 0.7],  # truths 1 and 2 tie with each other: rank 0
        ]
    )
    assert ranks(scores, [[0], [1], [2], [1, 2]]) == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "caption, text",
    [
        ("A Dog (left) runs!", "a dog left runs"),
        ("  two cats;  one: black.\n", "two cats one black"),
        ("it's a man's t-shirt, 3.5 m", "it's a man's t-shirt, 3 5 m"),
        (" ".join(["w"] * 60), " ".join(["w"] * 50)),
    ],
)
def test_lavis_text(caption, text):
    assert lavis_text(caption) == text


def test_recall_at_k():
    assert recall([0, 1, 4, 5, 9, 10, 100], at=(1, 5, 10)) == {1: 1 / 7, 5: 3 / 7, 10: 5 / 7}


def test_rerank_keeps_only_the_top_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    top = top_k(scores, 2)  # items 1 and 2
    out = rerank(scores, top, torch.tensor([[-1.0, 2.0]]))
    assert out[0, 2] == pytest.approx(2.5) and out[0, 1] == pytest.approx(-0.1)
    assert torch.isinf(out[0, [0, 3]]).all()
    assert top_k(scores, 10).shape == (1, 4)  # k larger than the items: all of them


def test_retrieval_metrics_both_directions():
    # 2 images, 4 texts (2 each); image 0's texts score highest for it, image 1's do not.
    i2t = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.9, 0.8, 0.3, 0.1]])
    out = retrieval_metrics(i2t, i2t.T, [[0, 1], [2, 3]], [0, 0, 1, 1])
    assert out["i2t_R@1"] == 0.5 and out["i2t_R@5"] == 1.0
    # texts 0, 1: image 0 ties with image 1 for text 0 and 1 -> rank 1; texts 2, 3: image 1 best for 2 only
    assert out["t2i_R@1"] == 0.25 and out["t2i_R@5"] == 1.0
    assert out["mean"] == pytest.approx((0.5 + 1 + 1 + 0.25 + 1 + 1) / 6)


# -- on a tiny checkpoint -------------------------------------------------------------------------------------
CAPTIONS = [
    ["an astronaut in a suit", "a woman smiling"],
    ["a cup of coffee", "a white cup on a saucer"],
    ["a cat", "an orange cat looking up"],
    ["a rocket on a launch pad", "a tall white rocket"],
    ["random noise", "colorful static"],
]


def brute_force(itc: torch.Tensor, itm: torch.Tensor, truth: list[list[int]], k: int) -> dict[int, float]:
    """Recall@1/5/10 computed directly: per query, the top k by ITC get ITC + ITM, the others go last;
    the items sorted with ties put before the ground truth."""
    hits = {1: 0, 5: 0, 10: 0}
    for q in range(itc.shape[0]):
        order_itc = sorted(range(itc.shape[1]), key=lambda j: -itc[q, j].item())[:k]
        score = {
            j: (itc[q, j] + itm[q, j]).item() if j in order_itc else float("-inf")
            for j in range(itc.shape[1])
        }
        ordered = sorted(score, key=lambda j: (-score[j], j in truth[q]))
        first = min(ordered.index(j) for j in truth[q])
        for at in hits:
            hits[at] += first < at
    return {at: n / itc.shape[0] for at, n in hits.items()}


@pytest.fixture(scope="module")
def tiny(retrieval_checkpoints, photos):
    """Our model, and the reference's ITC (5, 10) and ITM match logits (5, 10) of every image-text pair."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    path = retrieval_checkpoints["plain"]
    reference = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(path)
    images = [Image.open(p).convert("RGB") for p in photos]
    texts = [c for pair in CAPTIONS for c in pair]
    with torch.no_grad():
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        itc = reference(**inputs, use_image_text_matching_head=False).logits_per_image
        pairs = [(i, t) for i in range(len(images)) for t in range(len(texts))]
        inputs = processor(
            images=[images[i] for i, _ in pairs],
            text=[texts[t] for _, t in pairs],
            return_tensors="pt",
            padding=True,
        )
        itm = reference(**inputs, use_image_text_matching_head=True).logits_per_image[:, 1].reshape(5, 10)
    return load_retrieval(path, torch.device("cpu"), torch.float32), itc, itm


def test_itc_and_itm_scores_equal_the_reference(tiny, photos):
    model, itc, itm = tiny
    paths = [str(p) for p in photos]
    texts = [c for pair in CAPTIONS for c in pair]
    ours = itc_matrix(model, paths, texts)
    assert torch.allclose(ours, itc, atol=1e-5)
    assert torch.allclose(itm_logits(model, paths[1], texts), itm[1], atol=1e-4)
    i2t, t2i = rerank_both(ours, 3, lambda i, chosen: itm_logits(model, paths[i], [texts[t] for t in chosen]))
    for q in range(5):  # each image: its 3 best texts by ITC get ITC + ITM, the rest -inf
        best = itc[q].topk(3).indices
        assert torch.allclose(i2t[q, best], itc[q, best] + itm[q, best], atol=1e-4)
        assert torch.isinf(i2t[q]).sum() == 7
    for t in range(10):
        best = itc[:, t].topk(3).indices
        assert torch.allclose(t2i[t, best], itc[best, t] + itm[best, t], atol=1e-4)
        assert torch.isinf(t2i[t]).sum() == 2


@pytest.mark.parametrize("k", [3, 128])
def test_evaluate_retrieval_equals_brute_force(tiny, photos, tmp_path, k):
    model, itc, itm = tiny
    annotations = tmp_path / "ann.json"
    entries = [{"image": p.name, "caption": c} for p, c in zip(photos, CAPTIONS)]
    annotations.write_text(json.dumps(entries))
    result = evaluate_retrieval(model, annotations, photos[0].parent, split=None, k=k)

    image_texts = [[2 * i, 2 * i + 1] for i in range(5)]
    text_image = [[t // 2] for t in range(10)]
    expected_itc = brute_force(itc, torch.zeros_like(itc), image_texts, k=10**9)
    expected_itc_t2i = brute_force(itc.T, torch.zeros_like(itc.T), text_image, k=10**9)
    expected_i2t = brute_force(itc, itm, image_texts, k)
    expected_t2i = brute_force(itc.T, itm.T, text_image, k)
    got_itc, got_rerank = result["metrics"]["ITC"], result["metrics"][f"ITC+ITM (top {k})"]
    for at in (1, 5, 10):
        assert got_itc[f"i2t_R@{at}"] == expected_itc[at]
        assert got_itc[f"t2i_R@{at}"] == expected_itc_t2i[at]
        assert got_rerank[f"i2t_R@{at}"] == expected_i2t[at]
        assert got_rerank[f"t2i_R@{at}"] == expected_t2i[at]
    assert result["counts"] == {"images": 5, "texts": 10}

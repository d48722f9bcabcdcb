"""The stage-1 losses against direct computations written from LAVIS's definitions (blip2_qformer.py,
Qformer.py's BertLMHeadModel), on small tensors; and the ITG attention semantics on a tiny Q-Former."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2.loading.loader import load_checkpoint
from blip2.train import losses
from blip2.train.objectives import Stage1Objective, TextBatch


def lavis_itc(image_feats, text_feat, temp):
    """LAVIS, one GPU, no image ids: query-wise similarities, max over queries, CE with label smoothing 0.1."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # (B, B, Q)
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)
    sim_t2i = sim_t2q.max(-1)[0] / temp
    targets = torch.arange(image_feats.shape[0])
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
    ) / 2
    return loss, sim_i2t, sim_t2i


def lavis_itc_with_ids(sim_i2t, sim_t2i, image_ids):
    """LAVIS's retrieval fine-tuning branch ("image_id" in samples): soft targets over same-image pairs."""
    ids = image_ids.view(-1, 1)
    pos_idx = torch.eq(ids, ids.t()).to(sim_i2t.dtype)
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
    return (loss_t2i + loss_i2t) / 2


def features(b=5, q=4, e=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, q, e, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(b, e, generator=gen, dtype=torch.float64), dim=-1)
    return image, text


def test_itc_matches_lavis_with_distinct_images():
    image, text = features()
    temp = torch.tensor(0.07, dtype=torch.float64)
    expected, ref_i2t, ref_t2i = lavis_itc(image, text, temp)
    sim_i2t, sim_t2i = losses.itc_similarities(image, text, temp)
    torch.testing.assert_close(sim_i2t, ref_i2t, rtol=0, atol=1e-12)
    torch.testing.assert_close(sim_t2i, ref_t2i, rtol=0, atol=1e-12)
    got = losses.itc_loss(sim_i2t, sim_t2i, torch.arange(5))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_itc_shares_the_target_among_captions_of_one_image():
    image, text = features(b=6)
    image[3] = image[1]  # rows 1 and 3 (and 0, 5) show the same image
    image[5] = image[0]
    image_ids = torch.tensor([7, 2, 9, 2, 4, 7])
    temp = torch.tensor(0.1, dtype=torch.float64)
    sim_i2t, sim_t2i = losses.itc_similarities(image, text, temp)
    expected = lavis_itc_with_ids(sim_i2t, sim_t2i, image_ids)
    torch.testing.assert_close(losses.itc_loss(sim_i2t, sim_t2i, image_ids), expected, rtol=0, atol=1e-12)


def test_hard_negatives_follow_the_itc_softmax_and_never_pick_the_same_image():
    sim = torch.tensor(
        [[5.0, 1.0, 2.0, 0.0], [1.0, 5.0, 0.5, 3.0], [0.0, 2.0, 5.0, 1.0], [2.0, 2.0, 1.0, 5.0]]
    )
    image_ids = torch.tensor([0, 1, 2, 1])  # texts 1 and 3 share an image
    mask = image_ids[:, None] == image_ids[None, :]
    # LAVIS: same-image pairs filled with -10000, then one multinomial draw per row of the softmax
    expected_t2i = F.softmax(sim.T.masked_fill(mask, -10000), dim=1)
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        neg_images, neg_texts = losses.hard_negatives(sim, sim.T, image_ids, gen)
        assert not mask[torch.arange(4), neg_images].any()
        assert not mask[torch.arange(4), neg_texts].any()
        counts[torch.arange(4), neg_images] += 1
    torch.testing.assert_close(counts / draws, expected_t2i, rtol=0, atol=0.04)


def test_itm_loss_is_cross_entropy_of_positives_then_two_negatives():
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(losses.itm_loss(logits), F.cross_entropy(logits, labels), rtol=0, atol=0)


def test_itg_mask_queries_see_queries_text_sees_queries_and_earlier_text():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    q = 3
    got = losses.itg_attention_mask(q, text_mask)
    for b in range(2):
        for row in range(q + 4):
            for col in range(q + 4):
                if row < q:
                    allowed = col < q
                else:
                    allowed = col < q or (col <= row and bool(text_mask[b, col - q]))
                assert bool(got[b, row, col]) == allowed, (b, row, col)


def lavis_lm_loss(logits, labels):
    """BertLMHeadModel: scores[:, :-1] against labels[:, 1:], label smoothing 0.1, written out per token:
    -(1 - e) log p(y) - e * mean over the vocabulary of log p."""
    scores = F.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = scores[keep]  # (N, V)
    y = target[keep]
    per_token = -0.9 * picked.gather(1, y[:, None]).squeeze(1) - 0.1 * picked.mean(dim=1)
    return per_token.mean()


@pytest.fixture(scope="module")
def stage1(retrieval_checkpoints):
    checkpoint = load_checkpoint(retrieval_checkpoints["plain"], device="cpu")
    torch.manual_seed(0)
    objective = Stage1Objective(checkpoint.model, bos_id=checkpoint.processors.text.bos_id)
    text = checkpoint.processors.text.batch(
        ["a cat on a couch", "two dogs", "a red bus in the street"], "right"
    )
    images = torch.randn(
        3, 17, checkpoint.config.vision.hidden_size, generator=torch.Generator().manual_seed(2)
    )
    return objective, TextBatch(text.ids, text.mask, torch.arange(3)), images


def itg_hidden(objective, images, ids, mask):
    m = objective.model
    q = m.query_tokens.shape[1]
    x = torch.cat([m.query_tokens.expand(ids.shape[0], -1, -1), m.embeddings(ids)], dim=1)
    return m.qformer(x, images, num_queries=q, attention_mask=losses.itg_attention_mask(q, mask)), q


def test_itg_queries_do_not_see_text_and_text_is_causal(stage1):
    objective, text, images = stage1
    with torch.no_grad():
        hidden, q = itg_hidden(objective, images, text.ids, text.mask)
        # the queries' outputs are those of the image alone (LAVIS reuses them through past_key_values)
        torch.testing.assert_close(hidden[:, :q], objective.model.query(images), rtol=0, atol=1e-6)
        changed = text.ids.clone()
        changed[:, 3] = 7  # a later token changes nothing before it
        later, _ = itg_hidden(objective, images, changed, text.mask)
        torch.testing.assert_close(later[:, : q + 3], hidden[:, : q + 3], rtol=0, atol=1e-6)
        assert not torch.allclose(later[:, q + 3], hidden[:, q + 3])
        other, _ = itg_hidden(objective, images.flip(0), text.ids, text.mask)  # text sees the queries
        assert not torch.allclose(other[:, q:], hidden[:, q:])


def test_itg_loss_matches_lavis_lm_head_loss(stage1):
    objective, text, images = stage1
    with torch.no_grad():
        decoder_ids = text.ids.clone()
        decoder_ids[:, 0] = objective.bos_id  # [DEC] replaces [CLS]
        hidden, q = itg_hidden(objective, images, decoder_ids, text.mask)
        head = objective.itg_head
        m = objective.model
        # LAVIS's cls.predictions: dense, GELU, LayerNorm, then the word embeddings (tied) plus a bias
        x = F.gelu(F.linear(hidden[:, q:], head.dense.weight, head.dense.bias))
        x = F.layer_norm(x, (x.shape[-1],), head.LayerNorm.weight, head.LayerNorm.bias, head.LayerNorm.eps)
        logits = x @ m.embeddings.word_embeddings.weight.T + head.bias
        labels = decoder_ids.masked_fill(text.mask == 0, -100)
        expected = lavis_lm_loss(logits, labels)
        got = objective.itg_loss(images, text)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_stage1_total_is_the_sum_of_itc_itm_itg(stage1):
    objective, text, images = stage1
    with torch.no_grad():
        out = objective(images, text, torch.Generator().manual_seed(3))
        m = objective.model
        image_feats = m.project_images(m.query(images))
        text_feat = m.project_texts(m.text_features(text.ids, text.mask))
        itc, sim_i2t, sim_t2i = lavis_itc(image_feats, text_feat, objective.temp)
        neg_images, neg_texts = losses.hard_negatives(
            sim_i2t, sim_t2i, text.image_ids, torch.Generator().manual_seed(3)
        )
        ids = torch.cat([text.ids, text.ids, text.ids[neg_texts]])
        mask = torch.cat([text.mask, text.mask, text.mask[neg_texts]])
        pairs = torch.cat([images, images[neg_images], images])
        itm = F.cross_entropy(
            m.itm_logits(m.multimodal_features(pairs, ids, mask)), torch.tensor([1] * 3 + [0] * 6)
        )
    torch.testing.assert_close(out["itc"], itc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["itm"], itm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"] + out["itg"], rtol=1e-6, atol=1e-6)


def test_stage1_clamps_the_temperature(stage1):
    objective, text, images = stage1
    with torch.no_grad():
        objective.temp.fill_(5.0)
        objective(images, text, torch.Generator().manual_seed(0))
        assert float(objective.temp) == 0.5
        objective.temp.fill_(0.07)

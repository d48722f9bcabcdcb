"""Vision tower and Q-Former against transformers on the same tiny weights, float32, within 1e-5."""

import torch

from blip2.config import Blip2Config, QFormerConfig
from blip2.models.qformer import QFormer
from blip2.models.vision import VisionModel, resize_position_embedding


def _sub_state(model, prefix):
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def _ours(hf, cls, config, prefix):
    with torch.device("meta"):
        module = cls(config)
    module.load_state_dict(_sub_state(hf, prefix), strict=True, assign=True)
    return module.eval()


def test_vision_matches_reference(checkpoints, oracle):
    hf, _ = oracle(checkpoints["opt"])
    config = Blip2Config.from_dict(hf.config.to_dict())
    ours = _ours(hf, VisionModel, config.vision, "vision_model.")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf.vision_model(pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == expected.shape == (3, 17, 32)
    assert (got - expected).abs().max() < 1e-5


def test_vision_interpolates_positions_for_other_sizes(checkpoints, oracle):
    hf, _ = oracle(checkpoints["opt"])
    config = Blip2Config.from_dict(hf.config.to_dict())
    ours = _ours(hf, VisionModel, config.vision, "vision_model.")
    pixels = torch.randn(2, 3, 48, 40)  # 6 x 5 patches
    with torch.no_grad():
        expected = hf.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        got = ours(pixels)
    assert got.shape == (2, 31, 32)
    assert (got - expected).abs().max() < 1e-5


def test_resize_position_embedding_is_identity_at_same_size():
    pos = torch.randn(1, 17, 8)
    assert torch.allclose(resize_position_embedding(pos, (4, 4)), pos, atol=1e-6)


def test_qformer_matches_reference(checkpoints, oracle):
    hf, _ = oracle(checkpoints["t5"])
    config = Blip2Config.from_dict(hf.config.to_dict())
    ours = _ours(hf, QFormer, config.qformer, "qformer.")
    image = torch.randn(2, 17, 32)
    queries = hf.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        expected = hf.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        got = ours(queries, image, num_queries=queries.shape[1])
    assert got.shape == expected.shape == (2, 6, 32)
    assert (got - expected).abs().max() < 1e-5


def test_qformer_cross_attention_every_other_layer():
    q = QFormer(
        QFormerConfig(
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            encoder_hidden_size=8,
            cross_attention_frequency=2,
        )
    )
    assert [layer.has_cross_attention for layer in q.encoder.layer] == [True, False, True, False]

"""pfp.grow: a deeper model that starts out computing what the trained one did."""
import os

import pytest
import torch

from _tiny_pfp import tiny_config
from pfp.grow import grow_weights
from pfp.weights import build_model, load_weights, save_weights


def _backbone_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.backbone.latent_channels, 2, 8, 8, generator=g)
    text = torch.randn(2, 5, model.config.text["dim"], generator=g)
    return model.backbone(x, torch.tensor([0.3, 0.9]), text, None)


def test_grown_model_predicts_what_the_trained_one_did(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    with torch.no_grad():  # a "trained" model: no zero-initialised output left to hide a difference
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    src = str(tmp_path / "trained.safetensors")
    save_weights(model, src)
    weights, config = grow_weights(src, 3, str(tmp_path / "grown"))
    grown = load_weights(weights, config=None)
    assert len(grown.backbone.blocks) == 3 and os.path.isfile(config)
    torch.testing.assert_close(_backbone_out(grown), _backbone_out(model), rtol=1e-5, atol=1e-5)
    # the new blocks are not dead weight: their zeroed output projections get gradients at once
    grown.backbone.train()
    _backbone_out(grown).square().mean().backward()
    for block in grown.backbone.blocks[1:]:
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn[2]):
            assert torch.count_nonzero(layer.weight) == 0
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_grow_refuses_a_shallower_depth(tmp_path):
    model = build_model(tiny_config())
    src = str(tmp_path / "w.safetensors")
    save_weights(model, src)
    with pytest.raises(ValueError, match="depth must exceed the weights' depth 1"):
        grow_weights(src, 1, str(tmp_path / "grown"))

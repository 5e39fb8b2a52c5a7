"""The DiT: block slices compose, guidance acts on the right channels, embeddings match the formula."""
import math

import numpy as np
import pytest
import torch

from treeq.models.dit import sincos_pos_embed_2d
from treeq.models.registry import config_for, create_model, model_names


def test_block_slices_compose_to_forward(tiny_dit):
    x = torch.randn(3, 1, 32, 32)
    t = torch.tensor([1, 500, 999])
    y = torch.tensor([0, 4, 9])
    tokens, c = tiny_dit.embed(x, t, y)
    middle = tiny_dit.run_blocks(tokens, c, 0, 1)
    sliced = tiny_dit.head(tiny_dit.run_blocks(middle, c, 1, 2), c)
    assert torch.allclose(sliced, tiny_dit(x, t, y), atol=1e-6)


def test_guidance_on_noise_channels_and_official_flag(tiny_latent_dit):
    model = tiny_latent_dit
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 2, 1000, 1000])
    cond, uncond = model(x, t, y).chunk(2)
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)[:2]
    assert torch.allclose(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    assert torch.allclose(out[:, 4:], cond[:, 4:])  # learned variance is never guided
    official = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guidance_channels=3)[:2]
    assert torch.allclose(official[:, :3], out[:, :3])
    assert torch.allclose(official[:, 3], cond[:, 3])  # the official code leaves channel 3 unguided
    assert not torch.allclose(official[:, 3], out[:, 3])


def test_pos_embed_matches_the_mae_formula():
    dim, grid = 16, 4
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    expected = np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)
    assert np.allclose(sincos_pos_embed_2d(dim, grid).numpy(), expected, atol=1e-6)


def test_timestep_embedding_is_cos_then_sin():
    from treeq.models.dit import TimestepEmbedder
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert math.isclose(emb[1, 0].item(), math.cos(3.0), rel_tol=1e-6)


def test_registry_names_and_sizes():
    assert "DiT-XL/2" in model_names() and "DiT-MNIST" in model_names()
    xl = config_for("DiT-XL/2")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    testbed = create_model("DiT-MNIST")
    assert len(testbed.blocks) >= 12
    with pytest.raises(ValueError, match="unknown model name"):
        config_for("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model name"):
        config_for("DiT-S/3")


def test_zero_init_blocks_start_as_identity():
    model = create_model("DiT-MNIST", depth=2, hidden_size=32, num_heads=2)
    tokens, c = model.embed(torch.randn(2, 1, 32, 32), torch.tensor([5, 6]), torch.tensor([1, 2]))
    assert torch.equal(model.run_blocks(tokens, c), tokens)

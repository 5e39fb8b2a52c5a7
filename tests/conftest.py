"""Shared fixtures: tiny DiTs that build in milliseconds, seeded for reproducible outputs."""
import pytest
import torch

from treeq.models.registry import create_model

torch.set_num_threads(1)  # tests are small; one thread keeps them fast beside other work


@pytest.fixture
def tiny_dit():
    """A 2-block, width-64 pixel-space DiT shaped like the testbed (1 channel, 32x32, patch 4)."""
    torch.manual_seed(0)
    model = create_model("DiT-MNIST", depth=2, hidden_size=64, num_heads=4)
    _randomize_zero_init(model)
    return model.eval()


@pytest.fixture
def tiny_latent_dit():
    """A 2-block latent DiT shaped like DiT-XL/2 (4 channels, patch 2, 1000 classes), width 64."""
    torch.manual_seed(0)
    model = create_model("DiT-XL/2", depth=2, hidden_size=64, num_heads=4, input_size=8)
    _randomize_zero_init(model)
    return model.eval()


def _randomize_zero_init(model):
    """adaLN-Zero starts every block as the identity; tests need blocks that do something."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.normal_(std=0.05)

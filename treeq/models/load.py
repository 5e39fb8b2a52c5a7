"""One entry point for every model source: the embedded default, our files, official `.pt`, diffusers.

`load(spec)` decides by what `spec` names: "default", a `.safetensors`/`.json` pair
written by TreeQ, an official facebookresearch/DiT `.pt`, or a diffusers
`DiTTransformer2DModel` folder. Official checkpoints carry no config, so the
architecture is read off the tensor shapes.
"""
from pathlib import Path

from .checkpoint import CheckpointError, load_model, load_state_strict, read_torch_checkpoint
from .dit import DiT, DiTConfig
from .registry import FAMILY


def load(spec):
    """A DiT in eval mode from `spec` (see module docstring)."""
    if spec == "default":
        from ..testbed import WEIGHTS
        return load_model(WEIGHTS)
    path = Path(spec)
    if path.is_dir():
        from .diffusers_convert import load_diffusers
        return load_diffusers(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        state = read_torch_checkpoint(path)
        return load_state_strict(DiT(config_from_state(state, path)), state, path).eval()
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".json").exists():
        return load_model(path)
    raise FileNotFoundError(f"no model at {spec!r}: give 'default', a .safetensors/.json pair, "
                            "an official .pt checkpoint or a diffusers folder")


def config_from_state(state, source="checkpoint"):
    """DiTConfig of an official state dict, from its tensor shapes."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        table = state["y_embedder.embedding_table.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source} is not a DiT state dict (cannot read {error})") from None
    heads = {(depth_, hidden_): heads_ for depth_, hidden_, heads_ in FAMILY.values()}
    if (depth, hidden) not in heads:
        # the head count changes the output but is not stored in the weights
        raise CheckpointError(f"{source}: depth {depth}, width {hidden} is no published DiT size; "
                              "save it with TreeQ (safetensors + JSON config) instead")
    num_heads = heads[(depth, hidden)]
    return DiTConfig(input_size=int(round(tokens ** 0.5)) * patch, patch_size=patch, in_channels=in_channels,
                     hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
                     num_classes=table - 1, class_dropout_prob=0.1, learn_sigma=out_channels == 2 * in_channels)

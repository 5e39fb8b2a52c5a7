"""Deploy-time folding of online input transforms into the op before them, and what the rest cost.

SmoothQuant's x / s is free where the graph allows (Xiao et al., 2023, sec. 4): qkv's and fc1's inputs
are adaLN's modulate(norm(x), shift, scale), so s divides adaLN's shift and (1 + scale) rows; proj's input
is attention's weighted sum of v, so s divides qkv's v rows. fc2's input (after GELU) and every Hadamard
rotation stay online; `transform_macs` counts them.
"""
import torch
import torch.nn as nn

from ..methods.smooth import SmoothTransform
from .integer import IntLinear

# (block linear, adaLN chunks (shift, scale) of its modulate) for the folds into adaLN; proj folds into qkv.
_MODULATED = (("attn.qkv", (0, 1)), ("mlp.fc1", (3, 4)))


def transform_macs(layer):
    """Multiply-accumulates per token of `layer`'s online input transform (0 without one).

    A Hadamard rotation costs its fast transform's MACs, smoothing one multiply per input feature
    (counted per layer by bits.layer_overhead_macs).
    """
    transform = getattr(layer, "input_transform", None)
    return 0 if transform is None else transform.macs_per_token()


def fold_smoothing_(model):
    """Fold every foldable SmoothTransform of a DiT's integer layers into the op before it; returns the
    names of the layers whose transform was folded. Float outputs are unchanged up to rounding.

    A fold rescales output rows of the producing linear, which must be a float nn.Linear or an IntLinear
    without a branch (its per-row weight scales and bias absorb the factor exactly; a branch would too,
    but each kind would need its own rule, so such layers keep the online transform).
    """
    folded = []
    for index, block in enumerate(model.blocks):
        adaLN = block.adaLN_modulation[-1]
        width = block.attn.proj.in_features
        for name, (shift, scale) in _MODULATED:
            layer = block.get_submodule(name)
            if _smoothing(layer) is None or not _row_scalable(adaLN):
                continue
            s = layer.input_transform.scale.float()
            # modulate(h) / s = h (1 + scale) / s + shift / s: shift' = shift / s, scale' = (1 + scale) / s - 1
            _scale_rows_(adaLN, slice(shift * width, (shift + 1) * width), s.reciprocal())
            _scale_rows_(adaLN, slice(scale * width, (scale + 1) * width), s.reciprocal(), offset=1.0)
            layer.input_transform = None
            folded.append(f"blocks.{index}.{name}")
        proj, qkv = block.attn.proj, block.attn.qkv
        if _smoothing(proj) is not None and _row_scalable(qkv):
            # attention output channel j is a convex combination of v_j: dividing v_j by s_j divides it
            _scale_rows_(qkv, slice(2 * width, 3 * width), proj.input_transform.scale.float().reciprocal())
            proj.input_transform = None
            folded.append(f"blocks.{index}.attn.proj")
    return folded


def _smoothing(layer):
    transform = getattr(layer, "input_transform", None)
    return transform if isinstance(transform, SmoothTransform) else None


def _row_scalable(layer):
    if type(layer) is nn.Linear:
        return True
    return isinstance(layer, IntLinear) and layer.branch is None and layer.kernels is None


@torch.no_grad()
def _scale_rows_(layer, rows, factor, offset=0.0):
    """Output rows y_r -> (y_r + offset) * factor - offset of a linear, by its weight (scales) and bias."""
    weight = layer.weight if type(layer) is nn.Linear else layer.weight_scale
    weight[rows] *= factor.to(weight.dtype).unsqueeze(1)
    if layer.bias is None:
        if offset:
            raise ValueError("folding into (1 + scale) needs the adaLN linear's bias to hold the offset")
        return
    layer.bias[rows] = (layer.bias[rows] + offset) * factor.to(layer.bias.dtype) - offset

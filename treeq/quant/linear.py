"""The quantized linear every quantizable DiT layer becomes: a module swap that *is* an nn.Linear.

The float weight stays the source of truth and is fake-quantized at the layer's current bits.
Everything that depends on the bits is held per bit-width (weight codes, GPTQ codes, static
activation scales), so the mixed-precision search switches bits without re-quantizing, and a
bit-width whose calibrated state was never computed raises instead of silently falling back.
An input transform (Hadamard rotation, smoothing) and a full-precision branch (low-rank,
Monarch) wrap the quantized path.

Memory of a frozen layer (float32 weight of N entries): the weight (4N bytes), int8 codes and scales
per prepared w_bits (N bytes each), a fingerprint of the weight (4 (3 out + in) bytes) and, only while
`cache_dequantized` is on, the dequantized weight at the current bits (4N). `treeq.memory` counts it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bits import check_bits, is_full_precision
from .quantizers import (
    QuantizedWeight,
    check_weight_options,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
)

ACTIVATION_QUANTIZERS = ("dynamic", "dynamic-asym", "static")
ROUNDINGS = ("rtn", "gptq")
# Whether frozen layers keep the dequantized weight of the current w_bits between forwards (one float
# copy of the weight each) instead of dequantizing it on every forward. A layer's `cache_dequantized`
# (None: follow this) overrides it; `cache_dequantized_(model, on)` sets every layer of a model.
CACHE_DEQUANTIZED = False


class QuantLinear(nn.Linear):
    """y = Q_a(T(x)) @ Q_w(W)^T + bias + branch(T(x)), with T = `input_transform`.

    `weight` is W: the original weight with the inverse of T folded in and the branch's dense
    weight subtracted, so with both quantizers off the layer computes the original linear.
    w_bits / a_bits of 16 or 32 leave weight / input in floating point.

    Per-bit state, all in the state dict:
    - weight codes: round-to-nearest codes cached per w_bits; with `rounding="gptq"` the codes of
      `rounded_weights[w_bits]` instead, and no fallback for a w_bits GPTQ did not round.
    - `act_scales[a_bits]`: static per-tensor input scales (activations="static").
    Codes belong to the weight they were computed from. Before serving them the layer compares a
    fingerprint of the weight with the one taken then (`weight_fingerprint`: row and column sums of its
    bit patterns and row extremes, one read of the weight, no copy): any change through an optimizer (fused or not),
    `.data`, `copy_` or `load_state_dict` drops the RTN cache and the GPTQ codes. Training the weight (the
    STE path, gradients on) re-quantizes it every call and ignores GPTQ codes.
    """

    def __init__(self, in_features, out_features, bias=True, *, w_bits=32, a_bits=32, symmetric=True,
                 group_size=None, clip="minmax", activations="dynamic", rounding="rtn", input_transform=None,
                 branch=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_weight_options(in_features, group_size=group_size, clip=clip)
        if activations not in ACTIVATION_QUANTIZERS:
            raise ValueError(f"activations must be one of {ACTIVATION_QUANTIZERS}, got {activations!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.symmetric, self.group_size, self.clip = symmetric, group_size, clip
        self.activations, self.rounding = activations, rounding
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)
        self.register_parameter("step_gain", None)  # while step sizes train: a gain on each weight scale
        self.rounded_weights, self.act_scales, self._codes, self._stamp = {}, {}, {}, None
        self._fingerprint = None  # weight_fingerprint of the weight the codes came from; None: no codes yet
        self._dequantized = None  # (codes it came from, float weight): the forward's weight at the current bits
        self.cache_dequantized = None  # keep _dequantized between forwards; None: CACHE_DEQUANTIZED
        self.w_bits, self.a_bits = check_bits(w_bits), check_bits(a_bits)

    @classmethod
    def from_linear(cls, linear, w_bits=32, a_bits=32, **options):
        """Wrap `linear`, sharing its weight and bias parameters (no copy)."""
        # Built on the meta device: no memory or initialisation for parameters about to be replaced.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.set_bits(w_bits, a_bits)
        return layer

    def weight_options(self):
        """Keyword options of the weight quantizer (see quantizers.quantize_weight)."""
        return {"symmetric": self.symmetric, "group_size": self.group_size, "clip": self.clip}

    def set_bits(self, w_bits, a_bits):
        """Switch bits; raises if the per-bit state these bits need was never calibrated."""
        check_bits(w_bits), check_bits(a_bits)
        if self.activations == "static" and not is_full_precision(a_bits) and a_bits not in self.act_scales:
            raise ValueError(f"no static activation scale for a_bits {a_bits} (calibrated: "
                             f"{_listed(self.act_scales)}); prepare it with the recipe's switch_bits")
        if self.rounding == "gptq" and not is_full_precision(w_bits) and w_bits not in self.rounded_weights:
            raise ValueError(f"no GPTQ codes for w_bits {w_bits} (rounded: {_listed(self.rounded_weights)}); "
                             "prepare them with the recipe's switch_bits")
        self.w_bits, self.a_bits = w_bits, a_bits

    @property
    def act_scale(self):
        """The static input scale at the current a_bits, or None (dynamic, or inputs in float)."""
        if self.activations != "static" or is_full_precision(self.a_bits):
            return None
        if self.a_bits not in self.act_scales:
            raise ValueError(f"no static activation scale for a_bits {self.a_bits}")
        return self.act_scales[self.a_bits]

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        x_quantized = fake_quantize_activation(x, self.a_bits, symmetric=self.activations != "dynamic-asym",
                                               scale=self.act_scale)
        out = F.linear(x_quantized, self.fake_quantized_weight(), self.bias)
        return out if self.branch is None else out + self.branch(x)

    def fake_quantized_weight(self):
        """The weight the forward uses at the current w_bits.

        When gradients flow to the weight it is quantized anew with the straight-through estimator;
        otherwise it is dequantized from the codes of `quantized_weight()` (kept for the current codes only).
        """
        if is_full_precision(self.w_bits):
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return fake_quantize_weight(self.weight, self.w_bits, **self.weight_options())
        quantized = self.quantized_weight()
        if self.caches_dequantized():
            if self._dequantized is None or self._dequantized[0] is not quantized:  # one float copy, current bits
                with torch.no_grad(), torch.inference_mode(False):
                    self._dequantized = (quantized, dequantize_weight(quantized).to(self.weight.dtype))
            weight = self._dequantized[1]
        else:  # on the fly: the same float weight, held only while this forward runs
            self._dequantized = None
            with torch.no_grad():
                weight = dequantize_weight(quantized).to(self.weight.dtype)
        if self.step_gain is not None:  # step sizes in training: each scale times its gain
            return weight * self.step_gain.repeat_interleave(self.in_features // self.step_gain.shape[1], dim=1)
        return weight

    def caches_dequantized(self):
        """Whether the dequantized weight is kept between forwards (the layer's setting, else the module's)."""
        return CACHE_DEQUANTIZED if self.cache_dequantized is None else self.cache_dequantized

    def quantized_weight(self):
        """Integer codes and scales of the weight at the current w_bits (what the forward and an export use)."""
        if is_full_precision(self.w_bits):
            raise ValueError(f"layer weight is in full precision (w_bits={self.w_bits}); nothing to quantize")
        self._drop_stale_codes()
        if self.rounding == "gptq":
            if self.w_bits not in self.rounded_weights:
                raise ValueError(f"no GPTQ codes for w_bits {self.w_bits} (rounded: {_listed(self.rounded_weights)}): "
                                 "never computed, or the weight changed since; run GPTQ again")
            return self.rounded_weights[self.w_bits]
        if self.w_bits not in self._codes:
            # Outside inference mode, so codes cached under torch.inference_mode serve later training of a branch.
            with torch.no_grad(), torch.inference_mode(False):
                self._codes[self.w_bits] = quantize_weight(self.weight.detach(), self.w_bits, **self.weight_options())
        return self._codes[self.w_bits]

    def set_rounded_weight(self, quantized):
        """Use `quantized` (codes from a calibrated rounding of the current weight) at w_bits == quantized.bits."""
        if quantized.codes.shape != self.weight.shape:
            raise ValueError(f"rounded codes {tuple(quantized.codes.shape)} do not match the weight "
                             f"{tuple(self.weight.shape)}")
        self._drop_stale_codes()
        self.rounding = "gptq"
        self.rounded_weights[quantized.bits] = quantized

    def train_step_sizes_(self):
        """Make the weight's step sizes (its per-channel or per-group scales) trainable, LSQ-style with
        the codes held fixed: the forward uses (codes - zero_point) * scale * step_gain, gain 1 at first."""
        scale = self.quantized_weight().scale
        self.step_gain = nn.Parameter(torch.ones_like(scale))
        return self.step_gain

    def fold_step_sizes_(self):
        """Write the trained gains into the scales of the current codes (kept as fixed, calibrated codes)."""
        if self.step_gain is None:
            return
        quantized = self.quantized_weight()
        gain = self.step_gain.detach().to(quantized.scale.dtype)
        self.step_gain = None
        self.set_rounded_weight(QuantizedWeight(quantized.codes, quantized.scale * gain, quantized.zero_point,
                                                quantized.bits, quantized.group_size))

    def set_input_transform(self, transform, folded_weight):
        """Install T and the weight with T's inverse folded in, so the float output is unchanged."""
        if self.input_transform is not None:
            raise ValueError("layer already has an input transform; fold a combined one into the original weight")
        if self.branch is not None:
            raise ValueError("install the input transform before the branch: the branch reads transformed inputs")
        self._replace_weight(folded_weight)
        self.input_transform = transform

    def attach_branch(self, branch):
        """Add a full-precision branch (a module with forward(x) and dense()); the weight keeps the residual."""
        if self.branch is not None:
            raise ValueError("layer already has a branch; a second one would subtract its weight twice")
        with torch.no_grad():
            residual = self.weight - branch.dense().to(self.weight.dtype)
        self._replace_weight(residual)
        self.branch = branch

    def _replace_weight(self, new_weight):
        with torch.no_grad():
            self.weight.copy_(new_weight)

    def _stamp_now(self):
        weight = self.weight
        return self.symmetric, self.group_size, self.clip, tuple(weight.shape), weight.dtype, weight.device

    def _codes_fresh(self):
        """Whether the codes held were computed from the weight as it is now, with the current options."""
        return (self._fingerprint is not None and self._stamp == self._stamp_now()
                and _same_fingerprint(self._fingerprint, weight_fingerprint(self.weight)))

    def _drop_stale_codes(self):
        """Forget every code computed from another weight or other weight options."""
        if self._codes_fresh():
            return
        self._codes, self.rounded_weights, self._dequantized = {}, {}, None
        self._stamp, self._fingerprint = self._stamp_now(), weight_fingerprint(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Parameters and buffers, plus the per-bit state: `act_scales.<a_bits>`, `rounded_weights.<w_bits>.*`."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for bits, scale in self.act_scales.items():
            destination[f"{prefix}act_scales.{bits}"] = scale
        for bits, quantized in self.rounded_weights.items():
            destination[f"{prefix}rounded_weights.{bits}.codes"] = quantized.codes
            destination[f"{prefix}rounded_weights.{bits}.scale"] = quantized.scale
            if quantized.zero_point is not None:
                destination[f"{prefix}rounded_weights.{bits}.zero_point"] = quantized.zero_point

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        own = [key for key in state_dict if key.startswith(prefix) and key[len(prefix):].split(".")[0] in
               ("act_scales", "rounded_weights")]
        unexpected_keys[:] = [key for key in unexpected_keys if key not in own]
        parts = {}
        for key in own:
            parts.setdefault(tuple(key[len(prefix):].split(".")[:2]), {})[key.rsplit(".", 1)[-1]] = state_dict[key]
        for (kind, bits), tensors in sorted(parts.items()):
            if kind == "act_scales":
                self.act_scales[int(bits)] = state_dict[f"{prefix}act_scales.{bits}"].clone()
            else:
                self.set_rounded_weight(QuantizedWeight(tensors["codes"].clone(), tensors["scale"].clone(),
                                                        None if "zero_point" not in tensors else
                                                        tensors["zero_point"].clone(), int(bits), self.group_size))

    def _apply(self, fn, recurse=True):
        """Move the per-bit state with the module (.to, .cuda, .half); RTN codes are recomputed.

        GPTQ codes fresh before the move stay fresh: the fingerprint is taken again of the moved weight."""
        fresh = not self.weight.is_meta and self._codes_fresh()
        super()._apply(fn, recurse)
        self.rounded_weights = {bits: _map_tensors(fn, quantized) for bits, quantized in self.rounded_weights.items()}
        self.act_scales = {bits: fn(scale) for bits, scale in self.act_scales.items()}
        self._codes, self._dequantized = {}, None
        moved = fresh and not self.weight.is_meta
        self._stamp = self._stamp_now() if moved else None
        self._fingerprint = weight_fingerprint(self.weight) if moved else None
        return self

    def extra_repr(self):
        return (f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"activations={self.activations}, rounding={self.rounding}")


def cache_dequantized_(model, enabled=True):
    """Keep (or stop keeping, and free) the dequantized weight of every QuantLinear in `model`; returns it.

    On: a forward at unchanged bits reuses the float weight (one float copy per layer held). Off: each
    forward dequantizes the codes again; the outputs are the same bits either way."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.cache_dequantized = bool(enabled)
            if not enabled:
                module._dequantized = None
    return model


# Integer dtypes the bit patterns of a weight are summed as, by element size.
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def weight_fingerprint(weight):
    """What the layer remembers of the weight its codes came from, instead of a copy of it: (row sums,
    column sums) of the weight's bit patterns as integers, wrapping modulo 2^32 (2^64 for 8-byte
    dtypes), and (row maxima, row minima) of its values. Sums and extremes do not depend on the order of
    reduction, so an unchanged weight always matches (no false "changed", whatever the threads).

    Seen: any change of one entry, any change of a row's or column's sum, a row or column permutation
    (unless the permuted rows or columns have equal sums), a scaling or sign flip of the weight (the
    extremes move even where wrapped sums do not, e.g. x2 adds 2^23 to the bit pattern of every entry).
    Missed: changes keeping every row's and column's bit-pattern sum modulo 2^32 and every row's extremes
    (compensating bit changes within rows and columns). Costs 4 (3 out + in) bytes for a float32 weight
    and about the time of reading the weight once.
    """
    weight = weight.detach()
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    with torch.inference_mode(False):
        words = weight.view(_WORDS[weight.element_size()])
        total = torch.int64 if weight.element_size() == 8 else torch.int32
        return words.sum(1, dtype=total), words.sum(0, dtype=total), weight.amax(1), weight.amin(1)


def _same_fingerprint(first, second):
    """Equal sums and equal extremes (by value: -0.0 equals 0.0, and NaN matches NaN)."""
    if len(first) != len(second) or any(a.shape != b.shape for a, b in zip(first, second)):
        return False
    (rows, columns, *extremes), (other_rows, other_columns, *other_extremes) = first, second
    return (torch.equal(rows, other_rows) and torch.equal(columns, other_columns)
            and all(bool(((a == b) | (a.isnan() & b.isnan())).all()) for a, b in zip(extremes, other_extremes)))


def _listed(per_bits):
    return ", ".join(map(str, sorted(per_bits))) or "none"


def _map_tensors(fn, quantized):
    zero_point = None if quantized.zero_point is None else fn(quantized.zero_point)
    return QuantizedWeight(fn(quantized.codes), fn(quantized.scale), zero_point, quantized.bits, quantized.group_size)

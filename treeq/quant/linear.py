"""The quantized linear every quantizable DiT layer becomes: a module swap that *is* an nn.Linear.

The float weight stays the source of truth and is fake-quantized at the layer's current bits.
Fake-quantized weights are cached per bit-width, so the mixed-precision search switches bits
without re-quantizing. An input transform (Hadamard rotation, smoothing) and a full-precision
branch (low-rank, Monarch) wrap the quantized path.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import (
    check_bits,
    check_weight_options,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    is_full_precision,
    quantize_weight,
)


class QuantLinear(nn.Linear):
    """y = Q_a(T(x)) @ Q_w(W)^T + bias + branch(T(x)), with T = `input_transform`.

    `weight` is W: the original weight with the inverse of T folded in and the branch's dense
    weight subtracted, so with both quantizers off the layer computes the original linear.
    w_bits / a_bits of 16 or 32 leave weight / input in floating point. `act_scale` None means
    dynamic per-token input scales, a tensor a static per-tensor one.

    `rounded_weights` maps w_bits to codes found by a calibrated rounding (GPTQ); at those bits
    they replace round-to-nearest. They belong to the weight they were computed from: installing
    a transform or a branch drops them, and training the weight (the STE path) ignores them.
    They live in memory only, not in the state dict.
    """

    def __init__(self, in_features, out_features, bias=True, *, w_bits=32, a_bits=32, symmetric=True,
                 group_size=None, clip="minmax", act_scale=None, input_transform=None, branch=None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_weight_options(in_features, group_size=group_size, clip=clip)
        self.w_bits = check_bits(w_bits)
        self.a_bits = check_bits(a_bits)
        self.symmetric = symmetric
        self.group_size = group_size
        self.clip = clip
        self.register_buffer("act_scale", None if act_scale is None else torch.as_tensor(act_scale, device=device))
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)
        self.rounded_weights = {}
        self.clear_cache()

    @classmethod
    def from_linear(cls, linear, w_bits=32, a_bits=32, **options):
        """Wrap `linear`, sharing its weight and bias parameters (no copy)."""
        act_scale = options.pop("act_scale", None)
        # Built on the meta device: no memory or initialisation for parameters about to be replaced.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    w_bits=w_bits, a_bits=a_bits, device="meta", **options)
        layer.weight = linear.weight
        layer.bias = linear.bias
        if act_scale is not None:
            layer.act_scale = torch.as_tensor(act_scale, device=linear.weight.device)
        layer.clear_cache()
        return layer

    def weight_options(self):
        """Keyword options of the weight quantizer (see quantizers.quantize_weight)."""
        return {"symmetric": self.symmetric, "group_size": self.group_size, "clip": self.clip}

    def set_bits(self, w_bits, a_bits):
        """Switch bits; weights seen at these bits before come from the cache."""
        self.w_bits = check_bits(w_bits)
        self.a_bits = check_bits(a_bits)

    def clear_cache(self):
        """Drop the fake-quantized weights cached per w_bits (they are recomputed on demand)."""
        self._cache = {}
        self._cache_stamp = None

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        x_quantized = fake_quantize_activation(x, self.a_bits, scale=self.act_scale)
        out = F.linear(x_quantized, self.fake_quantized_weight(), self.bias)
        return out if self.branch is None else out + self.branch(x)

    def fake_quantized_weight(self):
        """The weight the forward uses at the current w_bits.

        When gradients flow to the weight it is recomputed with the straight-through estimator;
        otherwise it is cached per w_bits until the weight (or a weight option) changes.
        """
        if is_full_precision(self.w_bits):
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return fake_quantize_weight(self.weight, self.w_bits, **self.weight_options())
        # _version counts in-place changes (optimizer steps, copy_); data_ptr catches a replaced tensor.
        stamp = (self.weight._version, self.weight.data_ptr(), self.symmetric, self.group_size, self.clip)
        if stamp != self._cache_stamp:
            self._cache = {}
            self._cache_stamp = stamp
        if self.w_bits not in self._cache:
            self._cache[self.w_bits] = self._compute_fake_quantized_weight()
        return self._cache[self.w_bits]

    def quantized_weight(self):
        """Integer codes and scales of the weight at the current w_bits (what an export stores)."""
        if is_full_precision(self.w_bits):
            raise ValueError(f"layer weight is in full precision (w_bits={self.w_bits}); nothing to quantize")
        rounded = self.rounded_weights.get(self.w_bits)
        if rounded is not None:
            return rounded
        return quantize_weight(self.weight.detach(), self.w_bits, **self.weight_options())

    def set_rounded_weight(self, quantized):
        """Use `quantized` (a QuantizedWeight from a calibrated rounding) whenever w_bits == quantized.bits."""
        if quantized.codes.shape != self.weight.shape:
            raise ValueError(f"rounded codes {tuple(quantized.codes.shape)} do not match the weight "
                             f"{tuple(self.weight.shape)}")
        self.rounded_weights[quantized.bits] = quantized
        self.clear_cache()

    def set_input_transform(self, transform, folded_weight):
        """Install T and the weight with T's inverse folded in, so the float output is unchanged."""
        if self.input_transform is not None:
            raise ValueError("layer already has an input transform; fold a combined one into the original weight")
        self._replace_weight(folded_weight)
        self.input_transform = transform

    def attach_branch(self, branch):
        """Add a full-precision branch (a module with forward(x) and dense()); the weight keeps the residual."""
        with torch.no_grad():
            residual = self.weight - branch.dense().to(self.weight.dtype)
        self._replace_weight(residual)
        self.branch = branch

    def _replace_weight(self, new_weight):
        with torch.no_grad():
            self.weight.copy_(new_weight)
        self.rounded_weights = {}
        self.clear_cache()

    def _compute_fake_quantized_weight(self):
        # Outside inference mode, so a weight cached under torch.inference_mode serves later training of a branch.
        with torch.no_grad(), torch.inference_mode(False):
            rounded = self.rounded_weights.get(self.w_bits)
            if rounded is not None:
                return dequantize_weight(rounded).to(self.weight.dtype)
            return fake_quantize_weight(self.weight.detach(), self.w_bits, **self.weight_options())

    def _apply(self, fn, recurse=True):
        """Move rounded weights with the module (.to, .cuda, .half); cached weights are recomputed."""
        super()._apply(fn, recurse)
        self.rounded_weights = {bits: _map_tensors(fn, quantized) for bits, quantized in self.rounded_weights.items()}
        self.clear_cache()
        return self

    def extra_repr(self):
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


def _map_tensors(fn, quantized):
    zero_point = None if quantized.zero_point is None else fn(quantized.zero_point)
    return type(quantized)(fn(quantized.codes), fn(quantized.scale), zero_point, quantized.bits, quantized.group_size)

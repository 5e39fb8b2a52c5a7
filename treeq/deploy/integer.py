"""The integer inference path of a quantized linear: int8 x int8 -> int32 GEMM, rescaled once.

What an exported TreeQ checkpoint runs. Inputs are quantized per token at run time exactly as
QuantLinear's fake quantization rounds them and an exact integer GEMM does the multiply-accumulate;
only the float rounding order differs. A fresh layer holds int8 codes and runs `torch._int_mm`;
`deploy_` moves its weight behind the fastest exact backend of the machine (deploy/backends.py),
prepacked or held as b-bit planes.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bits import QUANTIZED_BITS, check_bits, is_full_precision
from ..quant.linear import ACTIVATION_QUANTIZERS
from ..quant.quantizers import QuantizedWeight, check_weight_options, code_range, dequantize_weight, token_quant_params
from .backends import RESIDENT, WeightKernel, choose_backend
from .gemm import int_matmul, to_float_in_place
from .pack import pack_planes, unpack_planes

class IntLinear(nn.Module):
    """y = s_x s_w ((codes_x - z_x) @ (codes_w - z_w)^T) + bias + branch(T(x)), with T = `input_transform`.

    Buffers: `weight_codes` (out, in) int8, `weight_scale` (out, n_groups) float32, `weight_zero_point`
    like the scale (asymmetric weights only), `bias`, and `act_scale` (activations="static": one
    per-tensor input scale). activations="dynamic" quantizes each token from its absmax, "dynamic-asym"
    from its min and max (a per-token zero point z_x, corrected after the GEMM). With a_bits 16 or 32 the
    input stays float and the layer multiplies it by the dequantized weight in floating point: there is
    no integer GEMM without integer inputs.
    """

    def __init__(self, in_features, out_features, *, w_bits, a_bits, bias=True, symmetric=True, group_size=None,
                 activations="dynamic", input_transform=None, branch=None, device=None):
        super().__init__()
        if check_bits(w_bits) not in QUANTIZED_BITS:
            raise ValueError(f"IntLinear holds integer weights: w_bits must be in {QUANTIZED_BITS}, got {w_bits}")
        if activations not in ACTIVATION_QUANTIZERS:
            raise ValueError(f"activations must be one of {ACTIVATION_QUANTIZERS}, got {activations!r}")
        check_weight_options(in_features, group_size=group_size)
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.activations = w_bits, check_bits(a_bits), activations
        static_act_scale = activations == "static" and not is_full_precision(a_bits)
        self.group_size = group_size
        n_groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("weight_zero_point", None if symmetric else torch.zeros(out_features, n_groups,
                                                                                      device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones((), device=device) if static_act_scale else None)
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)
        # Set by deploy_: one WeightKernel per weight group, and the (backend, resident) it was asked for.
        self.kernels, self.deployment = None, None

    @classmethod
    def from_quant_linear(cls, layer):
        """The integer twin of a QuantLinear at its current bits (transform and branch copied)."""
        quantized = layer.quantized_weight()
        module = cls(layer.in_features, layer.out_features, w_bits=layer.w_bits, a_bits=layer.a_bits,
                     bias=layer.bias is not None, symmetric=quantized.symmetric, group_size=quantized.group_size,
                     activations=layer.activations, input_transform=copy.deepcopy(layer.input_transform),
                     branch=copy.deepcopy(layer.branch), device=layer.weight.device)
        with torch.no_grad():
            module.weight_codes.copy_(quantized.codes)
            module.weight_scale.copy_(quantized.scale)
            if quantized.zero_point is not None:
                module.weight_zero_point.copy_(quantized.zero_point)
            if layer.bias is not None:
                module.bias.copy_(layer.bias)
            if layer.act_scale is not None:
                module.act_scale.copy_(layer.act_scale)
        return module

    @property
    def symmetric(self):
        return self.weight_zero_point is None

    def quantized_weight(self):
        """The held weight as a QuantizedWeight (what an export packs)."""
        return QuantizedWeight(self.codes(), self.weight_scale, self.weight_zero_point, self.w_bits, self.group_size)

    def codes(self):
        """The int8 weight codes (out_features, in_features), unpacked from the planes of a deployed layer."""
        if self.weight_codes is not None:
            return self.weight_codes
        numel = self.out_features * self.in_features
        return unpack_planes(self.weight_planes, self.w_bits, numel).view(self.out_features, self.in_features)

    def deploy_(self, backend="auto", resident="prepacked"):
        """Run the integer GEMM on `backend` ("auto": the fastest exact one here, see choose_backend).

        The int8 code buffer is replaced by b-bit planes (`weight_planes`; the state dict still shows
        `weight_codes`); resident="prepacked" adds the backend's prepacked int8 weight, "packed" keeps
        only the planes and unpacks them per call. Returns the layer.
        """
        if resident not in RESIDENT:
            raise ValueError(f"resident must be one of {RESIDENT}, got {resident!r}")
        codes = self.codes()
        width = self.in_features if self.group_size is None else self.group_size
        name = backend
        if backend == "auto" and not is_full_precision(self.a_bits):
            name = choose_backend(width, self.out_features, self.w_bits, resident=resident)
        self.kernels = None if is_full_precision(self.a_bits) else [
            WeightKernel(codes[:, group * width:(group + 1) * width], self.w_bits, name, resident)
            for group in range(self.weight_scale.shape[1])]
        if self.weight_codes is not None:
            self.register_buffer("weight_planes", pack_planes(codes, self.w_bits), persistent=False)
            self.weight_codes = None
        self.deployment = (backend, resident)
        # The input zero point's correction needs the weight's row sums; computed once, not per call.
        self.register_buffer("_weight_row_sums", dequantize_weight(self.quantized_weight()).sum(1), persistent=False)
        return self

    @property
    def backend(self):
        """Name of the backend the GEMM runs on."""
        return "int_mm" if self.kernels is None else self.kernels[0].name

    def resident_bytes(self):
        """Bytes this layer holds for inference: buffers and parameters (the transform and branch too) and
        any backend-prepacked weight."""
        tensors = list(self.buffers()) + list(self.parameters())
        held = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        return held + sum(kernel.resident_bytes() for kernel in self.kernels or [] if kernel.handle is not None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A deployed layer's codes go out as `weight_codes`, as a fresh layer's do."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_codes is None:
            destination[prefix + "weight_codes"] = self.codes()
            for key in ("weight_planes", "_weight_row_sums"):
                destination.pop(prefix + key, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading into a deployed layer loads the codes and deploys them again the same way."""
        deployed = self.weight_codes is None
        if deployed:
            self.weight_codes = torch.zeros(self.out_features, self.in_features, dtype=torch.int8,
                                            device=self.weight_scale.device)
            self.kernels = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if deployed:
            self.deploy_(*self.deployment)

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        flat = x.reshape(-1, self.in_features)
        if is_full_precision(self.a_bits):
            out = F.linear(flat.float(), dequantize_weight(self.quantized_weight()), self.bias)
        else:
            codes, scale, zero_point = self.quantize_input(flat)
            out = self.integer_matmul(codes)
            if zero_point is not None:  # sum_k z_x (codes_w - z_w) s_w: the input zero point's share
                row_sums = (self._weight_row_sums if self.kernels is not None
                            else dequantize_weight(self.quantized_weight()).sum(1))
                out.addr_(zero_point.squeeze(-1), row_sums, alpha=-1)
            # Token scale and bias in one pass over the (M, N) output.
            out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale, out=out)
        if self.branch is not None:
            out.add_(self.branch(flat))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, x):
        """(int8 codes (M, K), float32 scale (M, 1) or (), zero point (M, 1) or None), x ~ (codes - z) * scale.

        Rounds like quantizers.fake_quantize_activation (x times the reciprocal scale). The symmetric
        dynamic overhead next to the GEMM is two read-only row reductions, then one scaled copy rounded
        in place to int8.
        """
        qmin, qmax = code_range(self.a_bits, symmetric=True)
        x = x.float()
        if self.activations == "dynamic-asym":
            scale, zero_point = token_quant_params(x, self.a_bits, symmetric=False)
            low, high = code_range(self.a_bits, symmetric=False)
            return (x * scale.reciprocal()).round_().add_(zero_point).clamp_(low, high).to(torch.int8), scale, zero_point
        if self.act_scale is None:
            # max|x| as max(max x, -min x) from one aminmax pass: no |x| temporary (abs().amax() writes one;
            # linalg.vector_norm(inf) is several times slower on CPU, torch 2.13). Same value, so the same
            # scale as the quantizer's.
            low, high = torch.aminmax(x, dim=-1, keepdim=True)
            absmax = torch.maximum(high, low.neg_())
            scale = absmax.div_(qmax).clamp_min_(torch.finfo(torch.float32).tiny)
            # |x| / scale <= qmax up to one rounding, so codes are in range without a clamp.
            return (x * scale.reciprocal()).round_().to(torch.int8), scale, None
        scale = self.act_scale.float()
        return (x * scale.reciprocal()).round_().clamp_(qmin, qmax).to(torch.int8), scale, None

    def integer_matmul(self, codes):
        """sum_k codes_mk (codes_w_nk - z_n) s_w_n over each weight group: float32 (M, N), not yet scaled per token.

        Group-wise weights run one _int_mm per group (their scales differ along K); a zero point is
        a rank-one correction from the row sums of the input codes, so weights are never dequantized.
        """
        width = self.in_features if self.group_size is None else self.group_size
        out = None
        for group in range(self.weight_scale.shape[1]):
            columns = slice(group * width, (group + 1) * width)
            if self.kernels is not None:
                part = self.kernels[group](codes[:, columns])
            else:
                part = to_float_in_place(int_matmul(codes[:, columns], self.weight_codes[:, columns].t()))
            if self.weight_zero_point is not None:
                row_sums = codes[:, columns].sum(-1, dtype=torch.int32).float()
                part.addr_(row_sums, self.weight_zero_point[:, group], alpha=-1)
            part.mul_(self.weight_scale[:, group])
            out = part if out is None else out.add_(part)
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"activations={self.activations}, backend={self.backend}")

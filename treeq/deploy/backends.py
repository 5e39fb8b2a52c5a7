"""Integer GEMM backends of IntLinear: one exact int8 x int8 -> integer-sum product, several CPU kernels.

`torch._int_mm` always works (the fallback); oneDNN (`torch.ops.onednn.qlinear_pointwise`) and FBGEMM
(`torch.ops.quantized`) run prepacked weights. Which one is exact is a property of the machine (without
VNNI, x86 int8 kernels sum u8 x s8 pairs in saturating int16), so each is probed once, and weights wider
than a backend sums exactly are split in two. `choose_backend` times the exact ones on the layer's shape.
"""
import functools
import os
import statistics
import time
import warnings

import torch

from .gemm import int_matmul, to_float_in_place
from .pack import pack_planes, unpack_planes

RESIDENT = ("prepacked", "packed")  # weights held as the backend's int8 blob, or as b-bit planes unpacked per call
# Rows of the GEMM `choose_backend` times: a DiT image at 256 tokens is 256; fewer keep loading quick.
CHOICE_ROWS = 64
# Environment override of "auto" (a backend name), e.g. to rule out a kernel on a machine.
BACKEND_VARIABLE = "TREEQ_BACKEND"


def _int_mm_rows(codes, weight):
    """(M, K) int8 @ weight (N, K) int8 -> float32 (M, N) through torch._int_mm (padding as it needs)."""
    return to_float_in_place(int_matmul(codes, weight.t()))


class IntMM:
    """torch._int_mm: reads plain int8 weights, exact everywhere; slow on CPUs without VNNI or AMX."""

    name = "int_mm"

    @staticmethod
    def available():
        return hasattr(torch, "_int_mm")

    @staticmethod
    def prepare(weight):
        return weight

    @staticmethod
    def run(handle, codes):
        return _int_mm_rows(codes, handle)

    @staticmethod
    def handle_bytes(handle):
        return handle.numel()


class OneDNN:
    """oneDNN's quantized linear: u8 activations (code + 128, zero point 128) times prepacked s8 weights,
    unit scales and a float32 output, so it returns the integer sums."""

    name = "onednn"

    @staticmethod
    def available():
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    @staticmethod
    def prepare(weight):
        n = weight.shape[0]
        return (torch.ops.onednn.qlinear_prepack(weight.contiguous(), None), torch.ones(n),
                torch.zeros(n, dtype=torch.int32), weight.numel())

    @staticmethod
    def run(handle, codes):
        packed, ones, zeros, _ = handle
        # int8 code + 128 as a byte is the code's two's complement bits with the top bit flipped.
        shifted = codes.view(torch.uint8).bitwise_xor(128)
        return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, packed, ones, zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    @staticmethod
    def handle_bytes(handle):
        return handle[3] + 8 * handle[1].numel()


class FBGEMM:
    """FBGEMM's dynamic linear fed integer-valued float inputs with scale 1 and zero point 128, so its own
    input quantization reproduces our per-token codes exactly; per-channel unit weight scales."""

    name = "fbgemm"

    @staticmethod
    def available():
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")

    @staticmethod
    def prepare(weight):
        n = weight.shape[0]
        engine = torch.backends.quantized.engine
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes one
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(weight.contiguous(), torch.ones(n, dtype=torch.double),
                                                                 torch.zeros(n, dtype=torch.long), 0)
            try:
                torch.backends.quantized.engine = "fbgemm"
                return torch.ops.quantized.linear_prepack(quantized, None), weight.numel() + 4 * n
            finally:
                torch.backends.quantized.engine = engine

    @staticmethod
    def run(handle, codes):
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes.float(), 1.0, 128, handle[0])

    @staticmethod
    def handle_bytes(handle):
        return handle[1]


BACKENDS = {backend.name: backend for backend in (OneDNN, FBGEMM, IntMM)}  # in order of preference on ties


@functools.cache
def exact_limit(name):
    """Largest |weight code| (127 or 64) whose sums `name` returns exactly on this machine; 0 if none.

    Probes adversarial products: full-range activation codes (-128..127) against weights at the limit,
    for one row (a GEMV path), 17 and 64 rows.
    """
    backend = BACKENDS[name]
    if not backend.available():
        return 0
    generator = torch.Generator().manual_seed(0)
    for limit in (127, 64):
        exact = True
        for rows in (1, 17, 64):
            codes = torch.randint(-128, 128, (rows, 256), dtype=torch.int8, generator=generator)
            weight = torch.randint(-limit, limit + 1, (48, 256), dtype=torch.int8, generator=generator)
            codes[0], weight[0], weight[1] = 127, limit, -limit
            codes[-1, ::2] = -128
            try:
                out = backend.run(backend.prepare(weight), codes)
            except RuntimeError:
                return 0
            exact &= torch.equal(out.double(), (codes.long() @ weight.long().t()).double())
        if exact:
            return limit
    return 0


class WeightKernel:
    """One weight's codes (N, K) int8 behind a backend: `kernel(codes)` -> float32 (M, N) exact sums.

    resident="prepacked" keeps the backend's int8 blob (built once); "packed" keeps only b-bit planes
    and unpacks (and prepacks) them on every call, trading time for 1/8-of-FP32 memory at 4 bits.
    Codes wider than the backend's exact limit are split, W = W_a + W_b with both halves in range, and
    run as one GEMM over [x | x] and [W_a | W_b]: exact at twice the multiply-accumulates.
    """

    def __init__(self, weight, bits, backend="int_mm", resident="prepacked"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if resident not in RESIDENT:
            raise ValueError(f"resident must be one of {RESIDENT}, got {resident!r}")
        limit = exact_limit(backend)
        if limit == 0:
            raise ValueError(f"backend {backend} is not available or not exact on this machine")
        self.backend, self.bits, self.resident = BACKENDS[backend], bits, resident
        self.shape = tuple(weight.shape)
        self.split = limit if int(weight.abs().max()) > limit else None
        if resident == "packed":
            self.planes, self.handle = pack_planes(weight, bits), None
        else:
            self.planes, self.handle = None, self.backend.prepare(self._split(weight))

    @property
    def name(self):
        return self.backend.name

    def _split(self, weight):
        if self.split is None:
            return weight
        low = weight.clamp(-self.split, self.split)
        return torch.cat([low, weight - low], dim=1)  # |W - low| <= 127 - limit < limit

    def weight(self):
        """The int8 codes (N, K) this kernel multiplies by."""
        if self.planes is None:
            raise ValueError("a prepacked kernel keeps only the backend's blob; the layer holds the codes")
        return unpack_planes(self.planes, self.bits, self.shape[0] * self.shape[1]).view(self.shape)

    def __call__(self, codes):
        handle = self.handle if self.handle is not None else self.backend.prepare(self._split(self.weight()))
        if self.split is not None:
            codes = torch.cat([codes, codes], dim=1)
        return self.backend.run(handle, codes.contiguous())

    def resident_bytes(self):
        return self.planes.numel() if self.handle is None else self.backend.handle_bytes(self.handle)


def available_backends():
    """Names of the backends that are exact on this machine (for some weight range), preferred first."""
    return [name for name in BACKENDS if exact_limit(name)]


def choose_backend(in_features, out_features, bits, *, resident="prepacked", rows=CHOICE_ROWS, repeats=3):
    """The fastest exact backend for a (out_features, in_features) weight of `bits` bits on this machine.

    Times every available backend on random codes of the layer's shape and range (median of `repeats`
    after a warm-up call); a backend whose warm-up is 4x slower than the best median so far is dropped
    unmeasured. TREEQ_BACKEND=<name> overrides the choice. Cached per shape, bits and residency.
    """
    forced = os.environ.get(BACKEND_VARIABLE)
    if forced:
        if forced not in available_backends():
            raise ValueError(f"{BACKEND_VARIABLE}={forced} is not an exact backend here; "
                             f"available: {', '.join(available_backends())}")
        return forced
    return _timed_choice(in_features, out_features, bits, resident, rows, repeats)


@functools.cache
def _timed_choice(in_features, out_features, bits, resident, rows, repeats):
    generator = torch.Generator().manual_seed(0)
    limit = 2 ** (bits - 1) - 1
    weight = torch.randint(-limit, limit + 1, (out_features, in_features), dtype=torch.int8, generator=generator)
    codes = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
    best, best_seconds = None, float("inf")
    for name in available_backends():
        kernel = WeightKernel(weight, bits, name, resident)
        start = time.perf_counter()
        kernel(codes)
        if time.perf_counter() - start > 4 * best_seconds:
            continue
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(codes)
            samples.append(time.perf_counter() - start)
        if statistics.median(samples) < best_seconds:
            best, best_seconds = name, statistics.median(samples)
    return best

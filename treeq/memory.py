"""Peak memory of the running command, reported at its end: what a user sizes a machine by.

Peak resident set size of the process (Linux reports ru_maxrss in KiB) and, where CUDA was
used, the peak GPU memory that PyTorch's allocator held.
"""
import resource

import torch


def peak_memory():
    """{"peak_rss_mb": ..., "peak_gpu_mb": ... or None} of this process so far."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_mb = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2 ** 20
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu_mb is None else round(gpu_mb, 1)}


def describe_peak_memory():
    """One line: 'peak memory: RSS 3.70 GB, GPU 12.1 GB', with the largest child process's peak RSS where this
    process waited for any (a search's forked workers: their pages shared with this process count in both)."""
    peak = peak_memory()
    text = f"peak memory: RSS {peak['peak_rss_mb'] / 1024:.2f} GB"
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    if children > 0:
        text += f" (a child process: {children:.2f} GB, shared pages counted in both)"
    return text if peak["peak_gpu_mb"] is None else f"{text}, GPU {peak['peak_gpu_mb'] / 1024:.2f} GB"


def keep_freed_memory():
    """Ask glibc to keep freed memory in the heap instead of returning it to the OS (no-op elsewhere).

    Fresh pages fault on first touch; on VMs that reclaim memory aggressively each fault is costly, and code
    that writes new multi-megabyte tensors every call (a GEMM's output, a scored candidate's activations)
    pays them every call: a tree search on the deep testbed spent as much time in the kernel as in its own
    arithmetic. Process-wide: set where such work starts (a search's scoring, the kernel benches). Returns
    whether it took effect.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD in malloc.h
    return bool(libc.mallopt(mmap_threshold, 1 << 30)) and bool(libc.mallopt(trim_threshold, 1 << 30))


# ---------------------------------------------------------------------------------------------------
# Resident memory of a quantized model, by component, and the per-layer formula that projects it.

COMPONENTS = ("weights", "codes", "scales", "caches", "branches", "transforms", "other")


def resident_bytes(model):
    """{component: bytes} of every tensor `model` holds (each storage counted once; meta tensors hold none).

    weights: the float weights of quantized layers (QuantLinear.weight); codes: int8 weight codes (the
    round-to-nearest cache and GPTQ codes, every w_bits held); scales: their scales and zero points,
    static activation scales and trained step gains; caches: what a layer keeps only to go faster or to
    detect a changed weight (the dequantized weight, the weight's fingerprint or snapshot); branches and
    transforms: the tensors of full-precision branches and input transforms; other: every other
    parameter and buffer (biases, embeddings, norms, layers left in float). Includes "total".
    """
    from .quant.linear import QuantLinear

    seen, counts = set(), dict.fromkeys(COMPONENTS, 0)

    def add(component, tensor):
        if tensor is None or not torch.is_tensor(tensor) or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            counts[component] += storage.nbytes()

    def add_quantized(quantized):
        add("codes", quantized.codes)
        add("scales", quantized.scale)
        add("scales", quantized.zero_point)

    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        add("weights", module.weight)
        add("scales", module.step_gain)
        for per_bits in (module._codes, module.rounded_weights):
            for quantized in per_bits.values():
                add_quantized(quantized)
        for scale in module.act_scales.values():
            add("scales", scale)
        for _, buffer in module.named_buffers(recurse=False):  # a layer's own buffers: snapshot-like state
            add("caches", buffer)
        dequantized = getattr(module, "_dequantized", None)
        if dequantized is not None:
            add("caches", dequantized[1])
        for tensor in getattr(module, "_fingerprint", None) or ():
            add("caches", tensor)
        for part, component in ((module.branch, "branches"), (module.input_transform, "transforms")):
            if part is not None:
                for tensor in (*part.parameters(), *part.buffers()):
                    add(component, tensor)
    for tensor in (*model.parameters(), *model.buffers()):
        add("other", tensor)
    counts["total"] = sum(counts.values())
    return counts


def quantized_linear_bytes(out_features, in_features, *, bias=True, code_widths=1, group_size=None,
                           symmetric=True, cache_dequantized=False):
    """{component: bytes} a frozen float32 QuantLinear holds (no branch or transform), by the formula

        weights 4 N + codes c N + scales 4 c out g (x2 asymmetric: zero points)
        + caches 4 (3 out + in) (+ 4 N with cache_dequantized) + other (bias) 4 out,

    with N = out x in, c = code_widths (w_bits whose codes are held: the current one after a forward
    with round-to-nearest, every prepared one with GPTQ) and g = in / group_size groups (1 per
    channel). The 4 (3 out + in) is the weight's fingerprint (row and column sums of its bit patterns,
    row maxima and minima), held once codes exist."""
    entries = out_features * in_features
    groups = 1 if group_size is None else in_features // group_size
    caches = 4 * (3 * out_features + in_features) if code_widths else 0
    return {"weights": 4 * entries, "codes": code_widths * entries,
            "scales": 4 * code_widths * out_features * groups * (1 if symmetric else 2),
            "caches": caches + (4 * entries if cache_dequantized and code_widths else 0),
            "branches": 0, "transforms": 0, "other": 4 * out_features if bias else 0}


def project_resident_bytes(shapes, other_bytes=0, **options):
    """{component: bytes} of a quantized model from its quantizable linears' shapes, without building it.

    shapes: (out_features, in_features, bias) per quantized linear; other_bytes: every other parameter
    and buffer in float32 (see model_shapes); options: those of quantized_linear_bytes. Includes "total".
    """
    counts = dict.fromkeys(COMPONENTS, 0)
    for out_features, in_features, bias in shapes:
        for component, size in quantized_linear_bytes(out_features, in_features, bias=bias, **options).items():
            counts[component] += size
    counts["other"] += other_bytes
    counts["total"] = sum(counts.values())
    return counts


def model_shapes(model, names):
    """(shapes of the linears `names` as (out, in, bias), bytes of every other parameter and buffer):
    the arguments of project_resident_bytes. Works on a model built on the meta device."""
    shapes, held = [], set()
    for name in names:
        layer = model.get_submodule(name)
        shapes.append((layer.out_features, layer.in_features, layer.bias is not None))
        held.update(id(p) for p in (layer.weight, layer.bias) if p is not None)
    other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in held)
    return shapes, other


def dit_shapes(name="DiT-XL/2"):
    """model_shapes of a named DiT (built on the meta device): its quantizable linears (adaLN, qkv,
    proj, fc1, fc2 of each block)."""
    from .bits import quantizable_layers
    from .models.registry import create_model

    with torch.device("meta"):
        model = create_model(name)
    return model_shapes(model, quantizable_layers(model))


def flux_shapes(**config):
    """model_shapes of diffusers' FluxTransformer2DModel (its default config: FLUX.1, 19 double-stream
    and 38 single-stream blocks of width 3072), built on the meta device; the quantized linears are
    every nn.Linear inside its transformer blocks (embedders, final norm and projection stay float)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
             and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")]
    return model_shapes(model, names)


def projected_peaks(shapes, other_bytes, *, code_widths=1, gptq=False, cache_dequantized=False, **options):
    """{phase: {part: bytes, ..., "total": bytes}}: the tensors `treeq quantize` and `treeq search` hold
    at once in each phase (the Python runtime and the calibration set come on top), from the shapes.

    Both commands keep the loaded float model (`fp_model`) beside its quantized copy (`quantized`: the
    resident formula). Round-to-nearest makes no codes while quantizing (the first forward makes them);
    GPTQ rounds every prepared width (`code_widths` of them) after collecting every layer's Hessian
    (4 in^2 bytes each) at once. Phases: `quantize` (the methods run), `save` (`treeq quantize` copies
    the state dict to write it: `saved_state`), `search_scoring` (the search switches bits and runs the
    model: codes of every candidate width held, plus the calibration rows' hidden states, not counted).
    """
    fp_model = sum(4 * out * inp + (4 * out if bias else 0) for out, inp, bias in shapes) + other_bytes
    hessians = sum(4 * inp * inp for _, inp, _ in shapes) if gptq else 0
    held = project_resident_bytes(shapes, other_bytes, code_widths=code_widths if gptq else 0, **options)
    scoring = project_resident_bytes(shapes, other_bytes, code_widths=code_widths,
                                     cache_dequantized=cache_dequantized, **options)
    phases = {"quantize": {"fp_model": fp_model, "quantized": held["total"], "hessians": hessians},
              "save": {"fp_model": fp_model, "quantized": held["total"],
                       "saved_state": held["total"] - held["caches"]},
              "search_scoring": {"fp_model": fp_model, "quantized": scoring["total"]}}
    for parts in phases.values():
        parts["total"] = sum(parts.values())
    return phases


# ---------------------------------------------------------------------------------------------------
# The plan `treeq quantize` prints before its work: the tensors it will hold at once, by phase.

def quantize_plan(model, config, recipe, rows):
    """{phase: {part: bytes, ..., "total": bytes}} of `treeq quantize` on the loaded `model` (weights in the
    run's dtype), quantizing `config` in place with `recipe`, calibrated on `rows` rows (one sample each).

    Device (where the model runs): weights, every parameter and buffer as loaded (one copy: the quantized
    layers share them); codes, int8 GPTQ codes, one byte per weight entry and prepared width (round-to-
    nearest makes none while quantizing); and what calibrating one block holds (`fit_block_by_block`): the
    float32 Hessians of its linears (4 in^2 each) and one batch's block input, output and largest
    activation. Host: every row's block inputs and outputs (2 x rows x tokens x width, in the dtype), and on
    saving one shard of the state as safetensors serialises it (state_files.SHARD_BYTES at most). On a CPU
    run device and host are one memory. The Python runtime, the pipeline's other components (text
    encoders, VAE) and the calibration set itself come on top."""
    from .models.adapters import adapter_for
    from .ptq.apply import prepared_bits
    from .ptq.state_files import SHARD_BYTES

    element = next(model.parameters()).element_size()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    layers = {name: model.get_submodule(name) for name in config}
    gptq = "gptq" in recipe.methods
    codes = sum(len(prepared_bits(config[name], recipe, 0)) * layers[name].weight.numel()
                for name in layers) if gptq else 0
    adapter = adapter_for(model)
    tokens = adapter.layer_rows(model)
    hessians, activation = {}, 0
    for name, block in adapter.block_of(model).items():
        if name in layers:
            hessians[block] = hessians.get(block, 0) + (4 * layers[name].in_features ** 2 if gptq else 0)
            activation = max(activation, tokens[name] * max(layers[name].in_features, layers[name].out_features))
    widths = [layer.in_features for layer in layers.values()]
    state = max(tokens.values()) * max(set(widths), key=widths.count) * element  # one row's: the hidden width
    batch = min(rows, recipe.batch_size)
    device = {"weights": weights, "codes": codes, "hessians": max(hessians.values(), default=0),
              "batch": batch * (2 * state + activation * element)}
    phases = {"quantize (device)": device, "quantize (host)": {"block_states": 2 * rows * state},
              "save (host)": {"weights": weights, "codes": codes, "shard": min(SHARD_BYTES, weights + codes)}}
    for parts in phases.values():
        parts["total"] = sum(parts.values())
    return phases


def describe_plan(phases):
    """One line: each phase's total and its parts, in GB (1e9 bytes), or MB for a model under 1 GB."""
    unit, scale = ("GB", 1e9) if max(parts["total"] for parts in phases.values()) >= 1e9 else ("MB", 1e6)
    return "; ".join(f"{phase} {parts['total'] / scale:.2f} {unit} (" + ", ".join(
        f"{part} {size / scale:.2f}" for part, size in parts.items() if part != "total" and size) + ")"
        for phase, parts in phases.items())

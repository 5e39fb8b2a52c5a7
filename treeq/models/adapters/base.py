"""The adapter interface, its registry, and the diffusers block chain most families share.

A diffusers transformer is embedders -> a chain of blocks -> a head. `ChainAdapter` runs it in pieces
without re-implementing any family's forward: `embed` runs the model's own forward until block 0 and
keeps that block's keyword inputs (hidden streams, conditioning, rotary embeddings, masks); a block
maps those inputs to its outputs, which replace the streams it carries; `head` runs the model's own
forward with every block replaced by one that returns the given streams, so the head sees exactly
what it would after the last block.
"""
import inspect
from contextlib import contextmanager

import torch
import torch.nn as nn

ADAPTERS = {}  # model class name -> adapter


def register(*class_names):
    """Class decorator: the adapter serves models of these class names (and their subclasses)."""
    def wrap(cls):
        for name in class_names:
            ADAPTERS[name] = cls()
        return cls
    return wrap


def adapter_for(model):
    """The adapter of `model`'s class (or of its nearest registered base class)."""
    for klass in type(model).__mro__:
        if klass.__name__ in ADAPTERS:
            return ADAPTERS[klass.__name__]
    raise ValueError(f"{type(model).__name__} is not a supported transformer; supported: {', '.join(sorted(ADAPTERS))}")


def is_layer(module):
    """A quantizable layer: an nn.Linear (QuantLinear is one) or an exported integer linear (it has w_bits)."""
    return isinstance(module, nn.Linear) or hasattr(module, "w_bits")


def top_linears(module, prefix=""):
    """Layers under `module` in registration order, not descending into one (a branch is not a layer)."""
    for name, child in module.named_children():
        if is_layer(child):
            yield prefix + name
        else:
            yield from top_linears(child, f"{prefix}{name}.")


class CallInputs:
    """Keyword inputs of a transformer's forward, as its pipeline passed them: tensors with one row per
    sample first (`batched`) and values every row shares (`shared`: position ids, flags, None)."""

    def __init__(self, batched, shared):
        if not batched:
            raise ValueError("calibration inputs hold no batched tensor")
        rows = {len(tensor) for tensor in batched.values()}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"calibration tensors need one equal, non-zero number of rows, got {sorted(rows)}")
        self.batched, self.shared = batched, shared

    @classmethod
    def from_call(cls, kwargs, shared_keys=()):
        """Split one forward call's kwargs: tensors with the hidden states' batch size are per row."""
        rows = len(kwargs["hidden_states"])
        batched, shared = {}, {}
        for key, value in kwargs.items():
            per_row = torch.is_tensor(value) and value.dim() > 0 and len(value) == rows and key not in shared_keys
            (batched if per_row else shared)[key] = value.detach().cpu() if torch.is_tensor(value) else value
        return cls(batched, shared)

    @classmethod
    def concat(cls, calls):
        """One set of the rows of several calls; their shared values must agree."""
        first = calls[0]
        for call in calls[1:]:
            if call.shared.keys() != first.shared.keys() or call.batched.keys() != first.batched.keys() or not all(
                    _same(call.shared[key], first.shared[key]) for key in first.shared):
                raise ValueError("calibration calls differ in their shared inputs (resolution or prompt length); "
                                 "record them at one setting")
        return cls({key: torch.cat([call.batched[key] for call in calls]) for key in first.batched}, first.shared)

    def __len__(self):
        return len(next(iter(self.batched.values())))

    def select(self, index):
        return CallInputs({key: tensor[index] for key, tensor in self.batched.items()}, self.shared)

    def kwargs(self, rows=slice(None), device=None):
        """The forward's keyword arguments for `rows`, on `device`."""
        def move(value):
            return value.to(device) if torch.is_tensor(value) and device is not None else value
        return {**{key: move(value) for key, value in self.shared.items()},
                **{key: move(tensor[rows]) for key, tensor in self.batched.items()}}

    def to_dict(self):
        return {"batched": self.batched, "shared": self.shared}

    @classmethod
    def from_dict(cls, data):
        return cls(data["batched"], data["shared"])


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


class _Stop(Exception):
    """Raised by the hook that ends a forward at block 0, carrying that block's inputs."""

    def __init__(self, inputs):
        self.inputs = inputs


class ChainAdapter:
    """A diffusers transformer whose blocks form a chain (see the module docstring).

    Subclasses name: `block_lists` (the ModuleList attributes, in order), `carried` (the block inputs a
    block returns, in the order of its output tuple; one name: it returns a tensor), `shared_keys`
    (forward inputs that have no batch dimension), `modulation` (suffixes of the linears that compute a
    block's shifts, scales and gates from the conditioning: they run first, once per sample), `text`
    (substrings of linears that run on text tokens), `joint` (block lists whose linears see image and
    text tokens together), and the token counts of a sample at the family's default resolution.
    """

    family = ""
    block_lists = ("transformer_blocks",)
    carried = ("hidden_states",)
    shared_keys = ()
    modulation = ()
    text = ()
    joint = ()
    pipeline = ""        # the diffusers pipeline class that samples this family
    default_text_tokens = 0

    # --- structure ---------------------------------------------------------------------------------
    def block_names(self, model):
        return [f"{attribute}.{index}" for attribute in self.block_lists
                for index in range(len(getattr(model, attribute, ())))]

    def layers(self, model):
        """Linears inside the blocks, block by block; modulation linears first (they run first)."""
        names = []
        for block in self.block_names(model):
            linears = list(top_linears(model.get_submodule(block)))
            linears.sort(key=lambda name: not name.endswith(self.modulation) if self.modulation else False)
            names += [f"{block}.{name}" for name in linears]
        return names

    def block_of(self, model):
        """{layer: index of its block in the chain}."""
        index = {block: i for i, block in enumerate(self.block_names(model))}
        return {name: index[_block_prefix(name)] for name in self.layers(model)}

    def layer_rows(self, model):
        """{layer: rows it runs on per sample}: image tokens, text tokens, both (joint blocks), or 1."""
        image, text = self.image_tokens(model), self.text_tokens(model)
        rows = {}
        for name in self.layers(model):
            if self.modulation and name.endswith(self.modulation):
                rows[name] = 1
            elif name.split(".")[0] in self.joint:
                rows[name] = image + text
            elif any(part in name for part in self.text):
                rows[name] = text
            else:
                rows[name] = image
        return rows

    def image_tokens(self, model):
        """The folder's resolution (or the run's, models.family_load.resize_); else the config's latent size."""
        size = model.config.sample_size
        return getattr(model, "source", {}).get("image_tokens") or (size // model.config.patch_size) ** 2

    def text_tokens(self, model):
        return getattr(model, "source", {}).get("text_tokens") or self.default_text_tokens

    def describe(self, model):
        """The model's config as plain JSON values."""
        return {key: value for key, value in dict(model.config).items() if not key.startswith("_")}

    # --- calibration inputs ------------------------------------------------------------------------
    def num_rows(self, calibration):
        return len(calibration)

    def select_rows(self, calibration, index):
        return calibration.select(index)

    def batches(self, calibration, batch_size, device=None):
        for start in range(0, len(calibration), batch_size):
            yield calibration.kwargs(slice(start, start + batch_size), device)

    def forward(self, model, inputs):
        return model(**{**inputs, "return_dict": False})[0]

    # --- the chain in pieces -----------------------------------------------------------------------
    def embed(self, model, inputs):
        """The keyword inputs of block 0 (the model's own embedders computed them)."""
        first = model.get_submodule(self.block_names(model)[0])
        signature = inspect.signature(first.forward)

        def stop(module, args, kwargs):
            raise _Stop(dict(signature.bind(*args, **kwargs).arguments))

        handle = first.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.forward(model, inputs)
        except _Stop as stopped:
            return stopped.inputs
        finally:
            handle.remove()
        raise RuntimeError(f"{type(model).__name__}'s forward never reached its first block")

    def run_blocks(self, model, state, start, end):
        """Blocks start..end-1 of the chain on a block-input state; returns the state entering block end."""
        for block in self.block_names(model)[start:end]:
            state = {**state, **self._unpack(model.get_submodule(block)(**state))}
        return state

    def head(self, model, inputs, state):
        """The model output when the last block hands on the streams of `state`."""
        streams = self._pack(state)
        with _blocks_replaced(model, self.block_names(model), lambda *args, **kwargs: streams):
            return self.forward(model, inputs)

    def readout(self, state):
        """The carried streams of a state as one (rows, features) tensor: what a segment's metric reads."""
        parts = [state[key].flatten(1) for key in self.carried if state.get(key) is not None]
        return torch.cat(parts, dim=1)

    def _unpack(self, output):
        if len(self.carried) == 1:
            return {self.carried[0]: output[0] if isinstance(output, tuple) else output}
        return dict(zip(self.carried, output))

    def _pack(self, state):
        if len(self.carried) == 1:
            return state[self.carried[0]]
        return tuple(state.get(key) for key in self.carried)


def _block_prefix(name):
    attribute, index = name.split(".")[:2]
    return f"{attribute}.{index}"


@contextmanager
def _blocks_replaced(model, block_names, forward):
    blocks = [model.get_submodule(name) for name in block_names]
    for block in blocks:
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward

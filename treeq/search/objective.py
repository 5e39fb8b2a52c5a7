"""The model scorer of the search: the error of what the sampler uses, under Environmental Noise Guidance.

Scored on trajectory states, a configuration's error is that of the latent after one sampler step from
full-precision states: guidance applied as the sampler applies it, only the output channels the sampler reads,
weighted by how much the step moves with them; the sampler is our DiT's (diffusion/trajectory.py) or a
text-to-image family's own pipeline (diffusion/pipeline_states.py). (Scored on plain calibration rows, it is the
MSE of the model output.) While a segment of layers is scored, every other quantizable layer runs at `env_bits`
(ENG, TreeQ paper; 32 = full precision). A DiT is a chain of blocks (its family's adapter runs it in pieces), so
the state entering the segment's first block depends only on the environment: it is cached per (block,
env_bits) and each candidate runs from that block on, to the output or (readout_blocks) a few blocks past the
segment; blocks before the first layer where a candidate differs from the previous one are not run again.
"""
import torch

from ..bits import check_bits, quantizable_layers
from ..diffusion.trajectory import TrajectoryStates
from ..models.adapters import adapter_for
from ..ptq.apply import set_bits_
from ..ptq.calibration import num_rows
from ..quant.linear import QuantLinear
from .readouts import DEFAULT_READOUT, READOUTS


def mse_per_row(output, reference):
    """Mean squared error of each calibration row (the default metric), in float32 whatever the model's dtype."""
    return (output.float() - reference.float()).pow(2).flatten(1).mean(dim=1)


def batches_of(adapter, calibration, batch_size, device):
    """(model inputs, step weights) per batch: `batch_size` trajectory states (weights: their J), or
    `batch_size` plain calibration rows (weights None)."""
    if isinstance(calibration, TrajectoryStates):
        return list(calibration.batches(batch_size, device))
    return [(inputs, None) for inputs in adapter.batches(calibration, batch_size, device)]


def model_rows(calibration, model=None):
    """Rows the model runs per pass over `calibration`: a trajectory state's rows (its null pair too when the
    sampler guides), or the calibration rows themselves. A block run's cost is per row: block-row runs."""
    if isinstance(calibration, TrajectoryStates):
        return calibration.rows_per_state * len(calibration)
    return num_rows(calibration, model)


def resume_block(block_of, start, first, stop, assignment, previous):
    """The block where scoring a candidate of the segment starting at layer `start` begins: `first` for the first
    candidate of a call, else the block of its first layer differing from the candidate before it (the states
    before that block are kept), `stop` for a repeat. Shared with search/estimate.py's counter, so both count
    the same block runs."""
    if previous is None:
        return first
    differ = next((i for i, (a, b) in enumerate(zip(assignment, previous)) if a != b), None)
    return stop if differ is None else block_of[start + differ]


def sampler_output(calibration, output, weights):
    """What the objective compares at the model output: the sampler's step from it (trajectory states) or
    the output itself (plain rows)."""
    return output if weights is None else calibration.consumed(output, weights)


def output_error(model, calibration, config, *, batch_size=64, metric=mse_per_row):
    """The objective of `config` with the whole model scored, against full precision, averaged over every row
    (state) of `calibration`: what a search's choice is judged by on rows it did not score. Leaves `model`
    at `config`."""
    return output_errors(model, calibration, config, batch_size=batch_size, metric=metric).mean().item()


def output_errors(model, calibration, config, *, batch_size=64, metric=mse_per_row):
    """output_error row by row (state by state): what a paired comparison of two configurations resamples."""
    adapter = adapter_for(model)
    batches = batches_of(adapter, calibration, batch_size, next(model.parameters()).device)

    def outputs():
        return [sampler_output(calibration, adapter.forward(model, inputs), weights) for inputs, weights in batches]
    with torch.no_grad():
        set_bits_(model, {})
        reference = outputs()
        set_bits_(model, config)
        return torch.cat([metric(output, fp) for output, fp in zip(outputs(), reference)])


def _tensors(value):
    """Every tensor in a (nested) list, tuple or dict of them."""
    if torch.is_tensor(value):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [tensor for item in items for tensor in _tensors(item)]


class ModelObjective:
    """score(start, end, assignments) -> metrics for a model whose every quantizable layer is a QuantLinear.

    model: e.g. quantize(model, uniform_config(model, 8, 8), recipe); its bits are switched in
    place. calibration: TrajectoryStates (the error of one sampler step is read at the output), or the model
    family's inputs ((x_t, t, y) for our DiT; the output itself is read). readout_blocks: None reads the
    metric at the model output; k reads it on the hidden tokens k blocks after the segment's last block (at
    the output when that passes the last block) - cheaper, and only candidates of one segment are ever
    compared. readout: what is read there, "hidden" (the tokens) or "lens" (the model's head run on them,
    then what the output is read as: the sampler's step on trajectory states). metric(output, reference) ->
    per-row errors, averaged over rows (states at the output).
    batch_size: calibration rows (states) per forward.
    Memory: the cache holds up to depth hidden states of all calibration rows.
    Compute: `block_runs` counts the blocks score() has run, each on `model_rows` rows (the reference pass,
    the environment cache and timing runs are setup, not counted).
    """

    def __init__(self, model, calibration, env_bits, *, readout_blocks=None, readout="hidden", batch_size=320,
                 metric=mse_per_row):
        self.layers = quantizable_layers(model)
        plain = [name for name in self.layers if not isinstance(model.get_submodule(name), QuantLinear)]
        if plain:
            raise ValueError(f"{plain[0]} is not quantized; build the scored model with quantize(model, "
                             "uniform_config(model, 8, 8)) so every quantizable layer is a QuantLinear")
        if readout_blocks is not None and (isinstance(readout_blocks, bool) or not isinstance(readout_blocks, int)
                                           or readout_blocks < 0):
            raise ValueError(f"readout_blocks must be None or an int >= 0, got {readout_blocks!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        self.readout = readout
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self.modules = [model.get_submodule(name) for name in self.layers]
        block_of = self.adapter.block_of(model)
        self.block_of = [block_of[name] for name in self.layers]
        self.depth = len(self.adapter.block_names(model))
        self.env_bits = check_bits(env_bits)
        self.readout_blocks = readout_blocks
        self.metric = metric
        device = next(model.parameters()).device
        self.calibration = calibration
        self.rows = num_rows(calibration, model)
        self.model_rows = model_rows(calibration, model)
        self.block_runs = 0
        self._batches, self._weights = zip(*batches_of(self.adapter, calibration, batch_size, device))
        with torch.no_grad():
            set_bits_(model, {})  # full precision: the reference
            self._embedded = [self.adapter.embed(model, inputs) for inputs in self._batches]
            # FP readouts of the states leaving each block (index b + 1) and the output (index depth + 1).
            self._reference = {}
            states = self._embedded
            for block in range(self.depth):
                states = [self.adapter.run_blocks(model, state, block, block + 1) for state in states]
                self._reference[block + 1] = [self._read(index, state) for index, state in enumerate(states)]
            self._reference[self.depth + 1] = [self._output(index, state) for index, state in enumerate(states)]
        self._entering_cache = {}

    @property
    def settings(self):
        """What the metrics depend on besides the model: a resumed search refuses other settings."""
        return {"env_bits": self.env_bits, "rows": self.rows, "readout_blocks": self.readout_blocks,
                "readout": self.readout,
                "metric": getattr(self.metric, "__name__", repr(self.metric)),
                "objective": "sampler_step" if isinstance(self.calibration, TrajectoryStates) else "model_output"}

    def set_env_bits(self, env_bits):
        self.env_bits = check_bits(env_bits)

    def score(self, start, end, assignments):
        """One metric per assignment: the (w, a) pairs of layers start..end-1, all others at env_bits."""
        if not 0 <= start < end <= len(self.layers):
            raise ValueError(f"segment [{start}, {end}) is outside the {len(self.layers)} layers")
        first, stop = self.block_of[start], self.stop_block(start, end)
        metrics, previous, trail = [], None, None
        with torch.no_grad():
            self._set_environment()
            entering = self.entering(first)
            try:
                for assignment in assignments:
                    if len(assignment) != end - start:
                        raise ValueError(f"an assignment of segment [{start}, {end}) needs {end - start} pairs, "
                                         f"got {len(assignment)}")
                    for module, (w_bits, a_bits) in zip(self.modules[start:end], assignment):
                        module.set_bits(w_bits, a_bits)
                    # Candidates arrive in product order (left child major): consecutive ones share their
                    # first layers, and the blocks before the first differing layer need not run again.
                    resume = resume_block(self.block_of, start, first, stop, assignment, previous)
                    self.block_runs += stop - resume
                    trail = [entering] if resume == first else trail[:resume - first + 1]
                    for block in range(resume, stop):
                        trail.append([self.adapter.run_blocks(self.model, state, block, block + 1)
                                      for state in trail[-1]])
                    metrics.append(self._measure(trail[-1], stop))
                    previous = tuple(assignment)
            finally:
                self._set_environment()
        return metrics

    def stop_block(self, start, end):
        """The block where scoring a candidate of layers start..end-1 stops (its readout; depth: the output)."""
        last = self.block_of[end - 1]
        return self.depth if self.readout_blocks is None else min(self.depth, last + 1 + self.readout_blocks)

    def cache_bytes(self):
        """Bytes of the float states the scorer holds: FP readouts after every block and the output, and
        the states entering blocks cached so far (at most depth per env_bits; block 0's is the embedding)."""
        tensors = {id(t): t for part in (*self._reference.values(), *self._entering_cache.values(), self._embedded)
                   for t in _tensors(part)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def state_bytes(self):
        """Bytes of one state of all rows (the embedding's): what a block's activations scale with."""
        return sum(t.numel() * t.element_size() for t in _tensors(self._embedded))

    def warm(self):
        """Cache the state entering every block at env_bits now (search/pool.py forks workers that share it)."""
        with torch.no_grad():
            self.entering(self.depth - 1)

    def entering(self, block):
        """The state entering `block` with every layer at env_bits (per row batch), cached per (block, env_bits).

        Leaves the model's layers at env_bits."""
        key = (block, self.env_bits)
        if key not in self._entering_cache:
            self._set_environment()
            if block == 0:
                self._entering_cache[key] = self._embedded
            else:
                before = self.entering(block - 1)  # walks back to the nearest cached block
                self._entering_cache[key] = [self.adapter.run_blocks(self.model, state, block - 1, block)
                                             for state in before]
        return self._entering_cache[key]

    def _measure(self, states, stop):
        """The metric of the states leaving block stop - 1 (through the head when that is the last block)."""
        errors = []
        for index, (state, reference) in enumerate(zip(states, self._reference[stop + 1 if stop == self.depth
                                                                               else stop])):
            output = self._output(index, state) if stop == self.depth else self._read(index, state)
            errors.append(self.metric(output, reference))
        return torch.cat(errors).mean().item()

    def _read(self, index, state):
        """What a readout block gives: its hidden tokens, or the head's reading of them (readout "lens")."""
        return self._output(index, state) if self.readout == "lens" else self.adapter.readout(state)

    def _output(self, index, state):
        """What batch `index` gives at the output from the state leaving the last block (sampler_output)."""
        output = self.adapter.head(self.model, self._batches[index], state)
        return sampler_output(self.calibration, output, self._weights[index])

    def _set_environment(self):
        for module in self.modules:
            module.set_bits(self.env_bits, self.env_bits)

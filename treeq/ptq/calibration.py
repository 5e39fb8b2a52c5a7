"""Calibration data: (x_t, t, y) model inputs recorded along full-precision sampling trajectories.

The quantizers, smoothing and GPTQ see what the model sees at inference: noisy inputs
at every stage of sampling, conditional and null-class halves of the guided batch.
Sets are deterministic under a seed and cached on disk, keyed by the model weights
and the settings, so repeated runs skip the sampling.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ..distributed import barrier, decide, gather_steps, image_share, is_writer, merge_halves, split_recording
from ..io import atomic_write
from ..models.adapters import CallInputs, adapter_for
from ..models.adapters.dit import DiTAdapter
from ..diffusion.defaults import sampling_defaults
from ..diffusion.pipelines import collect_pipeline_calibration, is_pipeline_model, pipeline_settings
from ..diffusion.sampling import balanced_labels, kept_steps, sample
from ..diffusion.pipeline_states import PIPELINE_STATES_VERSION, PipelineStates, record_pipeline_states
from ..diffusion.trajectory import STATES_VERSION, TrajectoryStates, record_states

# Where calibration sets and trajectory states are cached: $TREEQ_CACHE_DIR (`--cache-dir`), else this.
DEFAULT_CACHE = Path("runs") / "calibration"


def cache_dir(folder=None):
    """The calibration cache: `folder`, else $TREEQ_CACHE_DIR, else ./runs/calibration."""
    return Path(folder or os.environ.get("TREEQ_CACHE_DIR") or DEFAULT_CACHE)


def _announce(path):
    print(f"calibration cached in {path} (--cache-dir or $TREEQ_CACHE_DIR to move it; reused by later runs)",
          file=sys.stderr, flush=True)
# Part of every cache key: bump it when the collection changes (2: per-sample noise seeds), so a
# cache written by older code is never read as this code's set.
COLLECTION_VERSION = 2


def model_fingerprint(model):
    """A short hash of a model's weights and config: a cache key that changes with any weight."""
    digest = hashlib.sha256(json.dumps(adapter_for(model).describe(model), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_calibration(model, num_images=32, num_timesteps=10, seed=1234, prompts=(), **sampling):
    """(x_t, t, y) at `num_timesteps` evenly spaced steps of the sampling trajectories of
    `num_images` images (labels balanced). With guidance each kept step adds 2 * num_images rows.
    Sampled on the model's device, kept on the CPU (the set is fed back in batches).

    A text-to-image family records its transformer's inputs through its own pipeline instead (CallInputs,
    prompts cycled from `prompts` or a built-in list), at every step when its sampler has fewer steps than
    `num_timesteps` (FLUX.1-schnell samples in 4)."""
    if is_pipeline_model(model):
        steps = pipeline_settings(model, **sampling)["steps"]
        return collect_pipeline_calibration(model, num_images, min(num_timesteps, steps), seed, list(prompts),
                                            **sampling)
    _refuse_prompts(model, prompts)
    settings = {**sampling_defaults(model), **sampling}
    keep = kept_steps(settings["steps"], num_timesteps)
    records, call = [], [0]

    def record(x, t, y):
        if call[0] % settings["steps"] in keep:
            records.append((x.cpu(), t.cpu(), y.cpu()))
        call[0] += 1

    share = image_share(num_images)  # under torchrun each rank samples its images, then the steps are joined
    labels = balanced_labels(num_images, model.config.num_classes)[share]
    sample(model, labels, seed=seed, progress=False, on_model_input=record, batch_size=len(share), indices=share,
           **settings)
    if split_recording(num_images):
        halves = len(records[0][0]) // len(share)  # a guided step runs the conditional rows, then the null rows
        records = [tuple(merge_halves(list(parts), halves) for parts in zip(*ranks)) for ranks in gather_steps(records)]
    return tuple(torch.cat(parts) for parts in zip(*records))


def load_or_collect(model, folder=None, **options):
    """`collect_calibration(model, **options)`, read from / written to a cache file keyed by both."""
    def saved(calibration):
        return calibration.to_dict() if isinstance(calibration, CallInputs) else list(calibration)

    def loaded(data):
        return CallInputs.from_dict(data) if isinstance(data, dict) else tuple(data)
    return _cached(model, folder, "", {**options, "collection_version": COLLECTION_VERSION},
                   lambda: collect_calibration(model, **options), saved, loaded)


def _cached(model, folder, tag, keyed, make, saved, loaded):
    """make(), read from / written to `folder`'s cache file named by the model's fingerprint, `tag` and a hash
    of `keyed`; a new file is announced."""
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    path = cache_dir(folder) / f"{model_fingerprint(model)}-{tag}{key}.pt"
    if decide(path.exists()):  # rank 0's view under torchrun: every rank loads, or every rank records its share
        return loaded(torch.load(path, weights_only=True))
    value = make()
    if is_writer():
        atomic_write(path, lambda p: torch.save(saved(value), p))
        _announce(path)
    barrier()  # the file is whole before any rank goes on
    return value


def spread_rows(calibration, rows, model=None):
    """`rows` calibration rows spread evenly over the set (it is ordered by sampling step)."""
    return split_rows(calibration, (rows,), model)[0]


def split_rows(calibration, counts, model=None):
    """Disjoint row sets of the calibration set: `counts[0]` rows spread evenly over it, `counts[1]` spread
    over the rows left, ..., then every row left (the held-out rows, possibly none).

    Why: a search scores its candidates on the first set; a refinement that picks among configurations
    on rows the search never saw, and a held-out error measured on rows neither saw, tell whether a
    choice generalises or was fitted to its rows."""
    adapter = _rows_view(calibration, model)
    left = torch.arange(adapter.num_rows(calibration))
    parts = []
    for name, count in zip(("calibration_rows", "refine_rows"), counts):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(left):
            unused = " (the rows the search does not score)" if parts else ""
            raise ValueError(f"{name} must be in 1..{len(left)}{unused}, got {count!r}")
        chosen = torch.linspace(0, len(left) - 1, count).round().long()
        parts.append(left[chosen])
        left = left[torch.isin(torch.arange(len(left)), chosen, invert=True)]
    parts.append(left)
    return [adapter.select_rows(calibration, index) for index in parts]


def expected_rows(model, recipe):
    """Rows collect_calibration will record for `recipe` (before recording them): images x kept steps, x 2
    where guidance runs the null condition beside each (cfg_scale above 1)."""
    settings = (pipeline_settings(model, **recipe.sampling) if is_pipeline_model(model)
                else {**sampling_defaults(model), **recipe.sampling})
    steps = min(recipe.calibration_timesteps, settings["steps"])
    return recipe.calibration_images * steps * (2 if settings["cfg_scale"] > 1 else 1)


def num_rows(calibration, model=None):
    """Rows of a calibration set (states of TrajectoryStates)."""
    return _rows_view(calibration, model).num_rows(calibration)


def _refuse_prompts(model, prompts):
    """Prompts condition the text-to-image families only: given for a class-conditional model, a one-line error."""
    if prompts:
        raise ValueError(f"prompts condition text-to-image families; {type(model).__name__} is class-conditional")


def _rows_view(calibration, model):
    if isinstance(calibration, TrajectoryStates):  # a state and its null pair stay together
        return _States()
    return DiTAdapter() if model is None else adapter_for(model)


class _States:
    """split_rows' view of TrajectoryStates: a row is a state."""

    def num_rows(self, states):
        return len(states)

    def select_rows(self, states, index):
        return states.select(index)


def load_or_record_states(model, folder=None, **options):
    """The trajectory states of the calibration set's trajectories, cached beside it: our sampler's
    (diffusion/trajectory.py), or a text-to-image family's pipeline's (diffusion/pipeline_states.py)."""
    if is_pipeline_model(model):
        return _cached(model, folder, "pipeline-states-", {**options, "states_version": PIPELINE_STATES_VERSION},
                       lambda: record_pipeline_states(model, **options), PipelineStates.to_dict, PipelineStates.from_dict)
    _refuse_prompts(model, options.pop("prompts", None))
    return _cached(model, folder, "states-", {**options, "states_version": STATES_VERSION},
                   lambda: record_states(model, **options), TrajectoryStates.to_dict, TrajectoryStates.from_dict)

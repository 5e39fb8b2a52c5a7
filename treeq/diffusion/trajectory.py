"""Trajectory states: the points of full-precision sampling where the search reads its error, as the sampler does.

A state is one step of a full-precision sampling trajectory: the model inputs of that step (the conditional
row, then its null-class pair when the sampler guides) and the step's sensitivity J = d x_next / d output,
measured on the sampler itself by central differences. Diffusers' schedulers act elementwise, so the change
of the latent that an output error makes in one step is the sum over output groups of J * error: exact for
the samplers linear in the output (DDIM, DPM-Solver++, Euler), linearised at the full-precision output for
DDPM's learned variance, and zero on channels the sampler never reads (the variance under DPM-Solver++).
"""
from dataclasses import dataclass, replace

import torch

from ..distributed import image_share, join_steps, split_recording
from ..models.dit import guided_output
from .defaults import sampling_defaults
from .sampling import balanced_labels, kept_steps, sample

# The finite-difference step: exact for the linear samplers whatever its size; small against the outputs
# (about unit scale) for DDPM's learned variance; far above float32 rounding of latents of unit scale.
PROBE = 1e-2
STATES_VERSION = 1  # part of the states' cache key (ptq/calibration.py): bump it when recording changes


@dataclass(frozen=True)
class TrajectoryStates:
    """Model rows of `len(weights)` states, state-major: `rows_per_state` rows each (the conditional row,
    then its null pair when guided), and each state's J (`weights`, shaped as the model output)."""
    inputs: tuple                 # (x_t, t, y) model rows
    weights: torch.Tensor         # (states, groups, latent channels, H, W): groups * latent channels = outputs
    rows_per_state: int
    cfg_scale: float
    guidance_channels: int

    def __len__(self):
        return len(self.weights)

    def select(self, index):
        """The states at `index` (with their model rows)."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = self.rows_of(index)
        return replace(self, inputs=tuple(part[rows] for part in self.inputs), weights=self.weights[index])

    def batches(self, states_per_batch, device=None):
        """(model inputs, weights) of consecutive states, `states_per_batch` at a time."""
        for start in range(0, len(self), states_per_batch):
            rows = self.rows_of(slice(start, start + states_per_batch))
            yield (tuple(part[rows].to(device) for part in self.inputs),
                   self.weights[start:start + states_per_batch].to(device))

    def rows_of(self, states):
        """The model rows of `states` (an index tensor, or a slice of consecutive states): state-major."""
        if isinstance(states, slice):
            return slice(states.start * self.rows_per_state, states.stop * self.rows_per_state)
        return (states[:, None] * self.rows_per_state + torch.arange(self.rows_per_state)).flatten()

    def consumed(self, output, weights):
        """The latent change one sampler step makes from the model's `output` rows of these states, up to a
        term that does not depend on the output: J * (guided output), summed over output groups."""
        if self.rows_per_state == 2:
            output = guided_output(output[0::2], output[1::2], self.cfg_scale, self.guidance_channels)
        return (weights * output.unflatten(1, (weights.shape[1], -1))).sum(1)

    def to_dict(self):
        return {"inputs": list(self.inputs), "weights": self.weights, "rows_per_state": self.rows_per_state,
                "cfg_scale": self.cfg_scale, "guidance_channels": self.guidance_channels}

    @classmethod
    def from_dict(cls, data):
        return cls(tuple(data["inputs"]), data["weights"], data["rows_per_state"], data["cfg_scale"],
                   data["guidance_channels"])


def step_sensitivity(x, out, advance):
    """J = d advance(out) / d out as (rows, groups, *x's shape[1:]): each group of len(x's channels) output
    channels is probed at once (the sampler is elementwise), by central differences of PROBE."""
    channels = x.shape[1]
    if out.shape[1] % channels:
        raise ValueError(f"the model's {out.shape[1]} output channels are not a multiple of the sampler's "
                         f"{channels} latent channels")
    parts = []
    for start in range(0, out.shape[1], channels):
        probe = torch.zeros_like(out)
        probe[:, start:start + channels] = PROBE
        parts.append((advance(out + probe) - advance(out - probe)) / (2 * PROBE))
    return torch.stack(parts, dim=1)


@torch.no_grad()
def record_states(model, num_images=32, num_timesteps=10, seed=1234, **sampling):
    """TrajectoryStates at `num_timesteps` evenly spaced steps of the full-precision trajectories of
    `num_images` images (labels balanced): the same trajectories `collect_calibration` records."""
    settings = {**sampling_defaults(model), **sampling}
    keep = kept_steps(settings["steps"], num_timesteps)
    guided = settings["cfg_scale"] != 1.0
    rows_per_state = 2 if guided else 1
    step, last_inputs, inputs, weights = [0], [None], [], []

    def on_model_input(x, t, y):
        last_inputs[0] = (x.cpu(), t.cpu(), y.cpu())

    def on_step(x, t, out, advance):
        if step[0] in keep:
            # (cond rows; null rows) -> state-major pairs
            inputs.append(tuple(part.unflatten(0, (rows_per_state, -1)).transpose(0, 1).flatten(0, 1)
                                for part in last_inputs[0]))
            weights.append(step_sensitivity(x, out, advance).cpu())
        step[0] += 1

    share = image_share(num_images)  # under torchrun each rank samples its images, then the steps are joined
    labels = balanced_labels(num_images, model.config.num_classes)[share]
    sample(model, labels, seed=seed, progress=False, on_model_input=on_model_input, on_step=on_step,
           batch_size=len(share), indices=share, **settings)
    if split_recording(num_images):  # states are state-major: a step's states join rank after rank
        inputs, weights = join_steps(inputs, weights, lambda ranks: tuple(map(torch.cat, zip(*ranks))))
    channels = model.config.in_channels if settings["guidance_channels"] is None else settings["guidance_channels"]
    return TrajectoryStates(tuple(torch.cat(parts) for parts in zip(*inputs)), torch.cat(weights), rows_per_state,
                            float(settings["cfg_scale"]), channels)


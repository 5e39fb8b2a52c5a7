"""Trajectory states of a text-to-image family: what its own pipeline's sampler consumes, one step at a time.

The search's objective for our DiT (diffusion/trajectory.py) is the latent's change one sampler step makes
from full-precision states. A diffusers pipeline guides and steps in its own code, so its states are
recorded around that code: the transformer's calls of a kept step (their inputs and outputs), the model
output the scheduler's `step` received, and the step's sensitivity J = d x_next / d model_output, probed on
copies of the scheduler (its multistep history and step index untouched) by central differences.

How the pipeline turned the transformer's rows into the scheduler's model output is read from the calls:
one call on twice the images (a guided batch, null rows first, as diffusers concatenates them), two calls a
step (Wan: conditional, then null), or one call on the images (FLUX.1's guidance is embedded: no null row);
the first latent channels where the transformer also predicts a variance (PixArt). Every recorded step is
checked: the guided output rebuilt from the full-precision rows must equal what the scheduler received, so
a pipeline that guides otherwise is refused instead of scored wrongly.
"""
import copy
from dataclasses import dataclass, replace

import torch

from ..distributed import image_share, join_steps, split_recording
from ..models.adapters import CallInputs, adapter_for
from .sampling import kept_steps, sample_generators
from .trajectory import PROBE, TrajectoryStates

PIPELINE_STATES_VERSION = 1


@dataclass(frozen=True)
class PipelineStates(TrajectoryStates):
    """Model rows of `len(weights)` states, state-major: the conditional row, then its null pair when the
    pipeline guides (`rows_per_state` 2). inputs: CallInputs; weights: each state's J, shaped as the latent.
    guidance_channels: the latent channels the scheduler reads (the first of the transformer's outputs)."""

    def select(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        if not len(index):  # no states (e.g. nothing held out): CallInputs holds at least one row, and none is read
            return replace(self, weights=self.weights[index])
        return replace(self, inputs=self.inputs.select(self.rows_of(index)), weights=self.weights[index])

    def batches(self, states_per_batch, device=None):
        for start in range(0, len(self), states_per_batch):
            rows = self.rows_of(slice(start, start + states_per_batch))
            yield self.inputs.kwargs(rows, device), self.weights[start:start + states_per_batch].to(device)

    def consumed(self, output, weights):
        """J * (what the scheduler reads): guided as the pipeline guides, on the latent's channels."""
        return weights * sampler_input(output, self.rows_per_state, self.cfg_scale, self.guidance_channels)

    def to_dict(self):
        return {"inputs": self.inputs.to_dict(), "weights": self.weights, "rows_per_state": self.rows_per_state,
                "cfg_scale": self.cfg_scale, "guidance_channels": self.guidance_channels}

    @classmethod
    def from_dict(cls, data):
        return cls(CallInputs.from_dict(data["inputs"]), data["weights"], data["rows_per_state"], data["cfg_scale"],
                   data["guidance_channels"])


def sampler_input(output, rows_per_state, cfg_scale, channels):
    """The scheduler's model output from state-major transformer rows (conditional, then null when guided):
    null + cfg_scale * (conditional - null), then the first `channels` channels (dim 1 of an image latent;
    a packed FLUX.1 latent has as many as the scheduler reads)."""
    output = output.float()
    if rows_per_state == 2:
        cond, null = output[0::2], output[1::2]
        output = null + cfg_scale * (cond - null)
    return output[:, :channels] if output.dim() > 3 else output


@torch.no_grad()
def record_pipeline_states(transformer, num_images=8, num_timesteps=4, seed=1234, prompts=None, **sampling):
    """PipelineStates at `num_timesteps` evenly spaced steps of the pipeline's trajectories of `num_images`
    samples: the same trajectories as diffusion.pipelines.collect_pipeline_calibration (same prompts, seeds
    and settings)."""
    from .pipelines import DEFAULT_PROMPTS, _call_kwargs, _cycled, load_pipeline, pipeline_settings

    settings = pipeline_settings(transformer, **sampling)
    pipeline = load_pipeline(transformer)
    steps = settings["steps"]
    keep = kept_steps(steps, min(num_timesteps, steps))
    adapter = adapter_for(transformer)
    recorder = _Recorder(transformer, pipeline.scheduler, adapter.shared_keys, keep)
    share = image_share(num_images)  # under torchrun each rank records its images, then the steps are joined
    cycled = _cycled(prompts or DEFAULT_PROMPTS, num_images)
    call = _call_kwargs(pipeline, settings, [cycled[i] for i in share], sample_generators(seed, share))
    with recorder:
        pipeline(**{**call, "num_inference_steps": steps})
    return recorder.states(len(share), float(settings["cfg_scale"]), split_recording(num_images))


class _Recorder:
    """Hooks on the transformer (inputs and outputs of each call) and the scheduler's step (what it consumed,
    and J probed on copies of it), kept for the steps in `keep`."""

    def __init__(self, transformer, scheduler, shared_keys, keep):
        import inspect

        self.transformer, self.scheduler, self.shared_keys, self.keep = transformer, scheduler, shared_keys, keep
        self.signature = inspect.signature(transformer.forward)
        self.step, self.pending, self.kept, self.dtype = 0, [], [], torch.float32

    def __enter__(self):
        self.handles = [self.transformer.register_forward_hook(self._on_call, with_kwargs=True)]
        self.original_step = self.scheduler.step
        self.scheduler.step = self._on_step
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        del self.scheduler.step  # the class's own method again

    def _on_call(self, module, args, kwargs, output):
        named = self.signature.bind(*args, **kwargs).arguments
        inputs = CallInputs.from_call({k: v for k, v in named.items() if k != "return_dict"}, self.shared_keys)
        result = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.dtype = result.dtype
        self.pending.append((inputs, result.detach().float().cpu()))

    def _on_step(self, model_output, timestep, sample, *args, **kwargs):
        if self.step in self.keep:
            self.kept.append((self.pending, model_output.detach().float().cpu(),
                              self._sensitivity(model_output, timestep, sample, args, kwargs).cpu()))
        self.step += 1
        self.pending = []
        return self.original_step(model_output, timestep, sample, *args, **kwargs)

    def _sensitivity(self, model_output, timestep, sample, args, kwargs):
        """d x_next / d model_output, elementwise, by central differences on two copies of the scheduler."""
        wrapper = self.scheduler.__dict__.pop("step")  # copies without this recorder (a bound method copies its object)
        try:
            copies = [copy.deepcopy(self.scheduler) for _ in range(2)]
        finally:
            self.scheduler.step = wrapper

        def advance(scheduler, output):
            result = scheduler.step(output, timestep, sample, *args, **{**kwargs, "return_dict": False})
            return result[0].float()
        return (advance(copies[0], model_output + PROBE) - advance(copies[1], model_output - PROBE)) / (2 * PROBE)

    def states(self, num_images, cfg_scale, split=False):
        """PipelineStates of the kept steps, each checked against what its scheduler consumed; split: this
        rank's share of a recording split over ranks, joined step by step (states are state-major)."""
        inputs, weights = [], []
        rows_per_state = None
        for calls, consumed, sensitivity in self.kept:
            rows, outputs, per_state = _state_major(calls, num_images)
            rows_per_state = per_state
            rebuilt = sampler_input(outputs, per_state, cfg_scale, consumed.shape[1])
            # the pipeline guided in the model's dtype, the rebuild in float32: a few of its roundings apart
            tolerance = 64 * torch.finfo(self.dtype).eps * (1 + cfg_scale) * consumed.abs().max().item()
            if rebuilt.shape != consumed.shape or (rebuilt - consumed).abs().max().item() > tolerance:
                raise ValueError("the pipeline's scheduler consumed an output that is not its transformer's rows "
                                 "guided as diffusers guides them; its states cannot be recorded")
            inputs.append(rows)
            weights.append(sensitivity)
        if not inputs:
            raise ValueError("the pipeline ran no kept denoising step")
        if split:
            inputs, weights = join_steps(inputs, weights, CallInputs.concat)
        return PipelineStates(CallInputs.concat(inputs), torch.cat(weights), rows_per_state, cfg_scale,
                              weights[0].shape[1])


def _state_major(calls, num_images):
    """(CallInputs, outputs, rows per state) of one step's calls in state-major order (conditional, null)."""
    if len(calls) == 2:  # Wan: the conditional call, then the null call
        (cond, cond_out), (null, null_out) = calls
        rows = CallInputs.concat([cond, null])
        order = torch.stack([torch.arange(num_images), num_images + torch.arange(num_images)], 1).flatten()
        return rows.select(order), torch.cat([cond_out, null_out])[order], 2
    if len(calls) != 1:
        raise ValueError(f"a denoising step called the transformer {len(calls)} times; expected one or two")
    inputs, output = calls[0]
    if len(inputs) == num_images:
        return inputs, output, 1
    if len(inputs) != 2 * num_images:
        raise ValueError(f"a denoising step ran {len(inputs)} rows for {num_images} images")
    # one guided batch, null rows first (diffusers' torch.cat([negative, positive]))
    order = torch.stack([num_images + torch.arange(num_images), torch.arange(num_images)], 1).flatten()
    return inputs.select(order), output[order], 2

"""QLoRA-style fine-tuning (PEFT) of a quantized transformer: the low-bit base stays frozen, the branches learn.

The student is a quantized run (its branches: Monarch, or low-rank for the baseline); the teacher
is the full-precision model the recipe names. The loss is the MSE between their outputs at random
inputs. For our DiT those are (x_t, t, y): training images noised to a uniformly drawn step, labels
dropped to the null class at the rate classifier-free guidance was trained with. A text-to-image
family has no training set here: its inputs are random rows of the calibration set its own
pipeline recorded (noisy latents, timesteps and prompt embeddings at every stage of sampling). Every draw comes from one seeded generator kept
in the checkpoint, so a resumed run continues exactly where an uninterrupted one would have been.

With `step_sizes` the weight quantizers' step sizes train too (LSQ-style, the codes held fixed: a
gain on each per-channel or per-group scale). At the end the gains are folded into the scales and the
codes become the layer's fixed, calibrated codes, so the run is bound to its bit configuration.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..bits import is_full_precision
from ..diffusion.loss import GaussianDiffusion
from ..flags import number
from ..io import atomic_write
from ..models.adapters import adapter_for
from ..quant.statistics import quantized_layers

CHECKPOINT_FILE = "finetune_checkpoint.pt"


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3            # AdamW on the branches only
    label_dropout: float = 0.1  # share of null-class labels, as the testbed was trained
    seed: int = 0
    checkpoint_every: int = 50
    step_sizes: bool = False    # also train the weight quantizers' step sizes (LSQ-style, codes fixed)


# The valid range of every numeric field: `treeq finetune` builds its flags from them (treeq/flags.py).
FINETUNE_RANGES = {
    "steps": number(int, 1), "batch_size": number(int, 1), "lr": number(float, 0, low_open=True),
    "label_dropout": number(float, 0, 1), "seed": number(int, 0), "checkpoint_every": number(int, 1),
}


def branch_parameters(model):
    """{name: parameter} of every branch beside a quantized layer: what PEFT trains."""
    parameters = {}
    for layer_name, layer in quantized_layers(model).items():
        if layer.branch is not None:
            parameters.update({f"{layer_name}.branch.{name}": p for name, p in layer.branch.named_parameters()})
    return parameters


def step_size_parameters(model):
    """{name: gain} on the weight step sizes of every layer with quantized weights, made trainable."""
    layers = {name: layer for name, layer in quantized_layers(model).items() if not is_full_precision(layer.w_bits)}
    return {f"{name}.step_gain": layer.step_gain if layer.step_gain is not None else layer.train_step_sizes_()
            for name, layer in layers.items()}


def finetune_(student, teacher, images, labels, config, folder, *, resume=False, progress=True):
    """Train `student`'s branches in place to match `teacher`; returns the per-step losses.

    images, labels: the DiT's training digits; for a text-to-image family `images` is its recorded
    CallInputs and `labels` None (see the module docstring).

    Writes `folder/finetune_checkpoint.pt` every `checkpoint_every` steps (branch parameters,
    optimizer, generator, losses); `resume=True` continues from it.
    """
    trainable = {**branch_parameters(student), **(step_size_parameters(student) if config.step_sizes else {})}
    if not trainable:
        raise ValueError("the quantized model has no branch to fine-tune; quantize with a branch method "
                         "(e.g. --method hadamard,monarch or --method lowrank), or train --step-sizes")
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    losses, start = [], 0
    checkpoint_path = Path(folder) / CHECKPOINT_FILE
    if resume:
        start, losses = _restore(checkpoint_path, trainable, optimizer, generator, config)
    adapter = adapter_for(student)
    draw = _recorded_rows(images) if labels is None else _noised_digits(images, labels, teacher, config)
    # eval mode for both: the DiT's own label dropout would draw from the global generator; labels
    # are dropped here, from the run's generator
    student.eval(), teacher.eval()
    with tqdm(range(start, config.steps), desc="fine-tune branches", disable=not progress,
              initial=start, total=config.steps) as bar:
        for step in bar:
            inputs = draw(generator, config.batch_size)
            with torch.no_grad():
                target = adapter.forward(teacher, inputs)
            loss = torch.nn.functional.mse_loss(adapter.forward(student, inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save(checkpoint_path, trainable, optimizer, generator, losses, config)
    for parameter in trainable.values():
        parameter.requires_grad_(False)
    for layer in quantized_layers(student).values():
        layer.fold_step_sizes_()
    return losses


def _noised_digits(images, labels, teacher, config):
    """draw(generator, n) -> (x_t, t, y): training digits at uniformly drawn noise levels."""
    diffusion, null_class = GaussianDiffusion(), teacher.config.num_classes

    def draw(generator, batch_size):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(images[index].shape, generator=generator)
        drop = torch.rand(batch_size, generator=generator) < config.label_dropout
        return diffusion.q_sample(images[index], t, noise), t, torch.where(drop, null_class, labels[index])
    return draw


def _recorded_rows(calibration):
    """draw(generator, n) -> forward kwargs of n random rows of a family's recorded calibration inputs."""
    def draw(generator, batch_size):
        return calibration.kwargs(torch.randint(0, len(calibration), (batch_size,), generator=generator))
    return draw


def _save(path, trainable, optimizer, generator, losses, config):
    state = {"trainable": {name: p.detach().clone() for name, p in trainable.items()}, "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "losses": losses, "config": asdict(config)}
    atomic_write(path, lambda p: torch.save(state, p))


def _restore(path, trainable, optimizer, generator, config):
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: no {path}")
    state = torch.load(path, weights_only=True)
    # steps may grow (a run extends) and checkpoints may come at another rate; the rest fixes the draws
    changed = sorted(key for key, value in state["config"].items()
                     if key not in ("steps", "checkpoint_every") and value != asdict(config)[key])
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}); resume with the same ones")
    if set(state["trainable"]) != set(trainable):
        raise ValueError(f"{path} holds the parameters of another model or other settings")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return len(state["losses"]), list(state["losses"])


def summary(losses, config):
    """What a run folder's config.json records of the fine-tuning."""
    head = sum(losses[:10]) / max(1, len(losses[:10]))
    tail = sum(losses[-10:]) / max(1, len(losses[-10:]))
    return {"config": asdict(config), "first_loss": head, "final_loss": tail, "steps": len(losses)}


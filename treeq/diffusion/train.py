"""Training a DiT with DiT's objective: seeded, checkpointed and resumable.

The recipe defaults (warm-up to a constant lr 1e-3, clipping, min-SNR weighting, an EMA
whose decay grows with the step) are chosen for learning fast on two CPU cores; see
docs/RESULTS.md for the measured run. Every random draw (batch indices, timesteps,
noise, label dropout) comes from one seeded generator saved in each checkpoint, so a
resumed run continues the same sequence.
"""
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..flags import number
from ..io import atomic_write
from ..models.checkpoint import save_model
from ..models.registry import create_model
from .loss import GaussianDiffusion


@dataclass
class TrainConfig:
    model: str = "DiT-MNIST"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3             # after warm-up; 3e-4 learned far slower on this testbed
    warmup_steps: int = 200      # then constant, as DiT trains: a run is a prefix of any longer run
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999     # reached after warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k))
    min_snr_gamma: float = 5.0   # 0 disables min-SNR weighting of the epsilon MSE
    snr_floor: float = 0.0       # x0-space weight floor ('truncated SNR' at 1); 0 disables
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 0             # torch threads; 0 keeps torch's default


# The valid range of every numeric field: `treeq train` builds its flags from them (treeq/flags.py).
TRAIN_RANGES = {
    "steps": number(int, 1), "batch_size": number(int, 1), "lr": number(float, 0, low_open=True),
    "warmup_steps": number(int, 1), "weight_decay": number(float, 0), "grad_clip": number(float, 0, low_open=True),
    "ema_decay": number(float, 0, 1), "min_snr_gamma": number(float, 0), "snr_floor": number(float, 0),
    "seed": number(int, 0), "checkpoint_every": number(int, 1), "threads": number(int, 0),
}


def lr_at(step, config):
    """Linear warm-up, then constant: `--resume --steps M` continues a run exactly as if it had asked for M."""
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _checkpoint_path(out_dir):
    return Path(out_dir) / "checkpoint.pt"


def train(config: TrainConfig, images, labels, out_dir, resume=False, log=print):
    """Train `config.model` on (images, labels); writes checkpoint.pt, log.jsonl and the EMA model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # model initialisation
    model = create_model(config.model, in_channels=images.shape[1], input_size=images.shape[-1])
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    diffusion = GaussianDiffusion()
    step = 0
    checkpoint_file = _checkpoint_path(out_dir)
    if resume:
        if not checkpoint_file.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_file}")
        state = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        if state["train_config"]["model"] != config.model:
            raise ValueError(f"checkpoint was trained as {state['train_config']['model']}, not {config.model}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        log(f"resumed from step {step}")
    text = json.dumps(asdict(config), indent=2, sort_keys=True)
    atomic_write(out_dir / "train_config.json", lambda p: p.write_text(text))
    model.train()
    gamma, floor = config.min_snr_gamma or None, config.snr_floor or None
    with open(out_dir / "log.jsonl", "a") as log_file, tqdm(total=config.steps, initial=step, desc="train") as bar:
        while step < config.steps:
            started = time.perf_counter()
            index = torch.randint(len(images), (config.batch_size,), generator=generator)
            t = torch.randint(diffusion.num_timesteps, (config.batch_size,), generator=generator)
            noise = torch.randn((config.batch_size, *images.shape[1:]), generator=generator)
            # Label dropout for classifier-free guidance, drawn from the run's generator too.
            drop = (torch.rand(config.batch_size, generator=generator) < model.config.class_dropout_prob).long()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            loss = diffusion.training_losses(model, images[index], t, labels[index], noise, gamma, floor,
                                              force_drop_ids=drop).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                      "lr": lr_at(step - 1, config), "seconds": time.perf_counter() - started}
            log_file.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                log_file.flush()
                atomic_write(checkpoint_file, lambda p: torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                    "step": step, "train_config": asdict(config)}, p))
                save_model(ema, out_dir / "model")
    return ema

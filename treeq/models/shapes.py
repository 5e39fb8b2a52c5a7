"""The transformer families at their published shapes without their memory: configs, token counts, models on
the meta device, reduced-depth models at real width, and inputs of the real shapes.

What a cost estimate or a timing needs of a model that may not fit this machine (FLUX.1 is 12B parameters,
48 GB in float32): counts come from a meta-device model, one block of each kind is built at real width to be
timed, and its inputs have the tokens of a sample at the family's published resolution.
"""
import tempfile
from pathlib import Path

import torch

from .families import FAMILIES, _randomize_zero_init, _settings
from .sizes import vae_scale

# One block of each kind: the config overrides of a reduced-depth model at real width, and which of its
# blocks stands for block b of the published model (depth blocks).
REDUCED = {
    "pixart": ({"num_layers": 1}, lambda b, depth: 0),
    "sd3": ({"num_layers": 2}, lambda b, depth: 1 if b == depth - 1 else 0),  # the last: context_pre_only
    "flux": ({"num_layers": 1, "num_single_layers": 1}, lambda b, depth: 0 if b < 19 else 1),
    "sana": ({"num_layers": 1}, lambda b, depth: 0),
    "wan": ({"num_layers": 1}, lambda b, depth: 0),
}


def transformer_config(name, size="full", reduced=False):
    """The family's transformer config at `size`; reduced: cut to one block of each kind (REDUCED)."""
    family = FAMILIES[name]
    config = dict(family.tiny if size == "tiny" else family.full)
    if reduced:
        config.update(REDUCED[name][0])
    return config


def vae_config(name, size="full"):
    family = FAMILIES[name]
    return family.full_vae or family.vae if size == "full" else family.vae


def sampling_settings(name, size="full"):
    """The settings `treeq init --size` writes for the family (resolution, steps, guidance)."""
    return _settings(FAMILIES[name], size)


def token_counts(name, size="full"):
    """{image_tokens, text_tokens} per sample at the family's resolution: what `treeq init --size` records."""
    import diffusers

    from .family_load import _token_counts

    family = FAMILIES[name]
    with tempfile.TemporaryDirectory() as folder, torch.device("meta"):
        transformer = getattr(diffusers, family.transformer)(**transformer_config(name, size, reduced=True))
        getattr(diffusers, family.vae_class)(**vae_config(name, size)).save_config(Path(folder) / "vae")
        return _token_counts(transformer, Path(folder), sampling_settings(name, size))


def meta_transformer(name, size="full", reduced=False):
    """The family's transformer on the meta device (shapes, no memory), with what a loaded one carries: its
    token counts in `source` and its sampling settings in `sampling`."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, FAMILIES[name].transformer)(**transformer_config(name, size, reduced))
    model.source = token_counts(name, size)
    model.sampling = dict(sampling_settings(name, size))
    return model


def reduced_transformer(name, size="full", seed=0):
    """One block of each kind at the real width (REDUCED), random weights, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, FAMILIES[name].transformer)(**transformer_config(name, size, reduced=True))
    _randomize_zero_init(model)
    model.source = token_counts(name, size)
    return model.eval()


def synthetic_inputs(name, model, rows, size="full", seed=0):
    """Keyword inputs of the transformer's forward for `rows` samples at the family's resolution: random
    latents and text features of the shapes its pipeline would pass (timestep mid-schedule)."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    settings = sampling_settings(name, size)
    scale = vae_scale(vae_config(name, size))
    latent = (settings["height"] // scale, settings["width"] // scale)
    return SYNTHETIC[name](model.config, settings, latent, model.source["text_tokens"], rows, randn)


def _pixart_inputs(config, settings, latent, text, rows, randn):
    return {"hidden_states": randn(rows, config.in_channels, *latent),
            "encoder_hidden_states": randn(rows, text, config.caption_channels), "timestep": _mid(rows),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(config, settings, latent, text, rows, randn):
    return {"hidden_states": randn(rows, config.in_channels, *latent),
            "encoder_hidden_states": randn(rows, text, config.joint_attention_dim),
            "pooled_projections": randn(rows, config.pooled_projection_dim), "timestep": _mid(rows)}


def _flux_inputs(config, settings, latent, text, rows, randn):
    """Latents packed 2x2 into tokens; position ids without a batch dimension; timesteps in [0, 1]."""
    h, w = latent[0] // 2, latent[1] // 2
    image_ids = torch.zeros(h, w, 3)
    image_ids[..., 1] += torch.arange(h)[:, None]
    image_ids[..., 2] += torch.arange(w)[None, :]
    return {"hidden_states": randn(rows, h * w, config.in_channels),
            "encoder_hidden_states": randn(rows, text, config.joint_attention_dim),
            "pooled_projections": randn(rows, config.pooled_projection_dim), "timestep": _mid(rows) / 1000,
            "img_ids": image_ids.reshape(h * w, 3), "txt_ids": torch.zeros(text, 3), "guidance": None}


def _sana_inputs(config, settings, latent, text, rows, randn):
    return {"hidden_states": randn(rows, config.in_channels, *latent),
            "encoder_hidden_states": randn(rows, text, config.caption_channels), "timestep": _mid(rows)}


def _wan_inputs(config, settings, latent, text, rows, randn):
    """Video latents: the first frame alone, then one latent frame per four."""
    frames = (settings["num_frames"] - 1) // 4 + 1
    return {"hidden_states": randn(rows, config.in_channels, frames, *latent),
            "encoder_hidden_states": randn(rows, text, config.text_dim), "timestep": _mid(rows)}


SYNTHETIC = {"pixart": _pixart_inputs, "sd3": _sd3_inputs, "flux": _flux_inputs, "sana": _sana_inputs,
             "wan": _wan_inputs}


def _mid(rows):
    """A mid-schedule timestep for every row (of the 1000 training timesteps)."""
    return torch.full((rows,), 500.0)

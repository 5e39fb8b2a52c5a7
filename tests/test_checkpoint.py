"""Checkpoint loading: our safetensors+JSON pair, official `.pt` files, diffusers folders, and bad input."""
import argparse
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from treeq.models.checkpoint import CheckpointError, load_model, load_official, save_model
from treeq.models.diffusers_convert import config_from_diffusers, convert_diffusers_state_dict
from treeq.models.diffusers_load import load_diffusers
from treeq.models.registry import config_for, create_model, model_names

TINY_LATENT = dict(depth=2, hidden_size=64, num_heads=4)  # the overrides behind the tiny_latent_dit fixture
DIFFUSERS_TINY = dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, sample_size=8,
                      patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=10)


def _inputs(model, batch=3):
    """Seeded inputs that include the null class, so the extra embedding row is exercised too."""
    generator = torch.Generator().manual_seed(1)
    size, channels = model.config.input_size, model.config.in_channels
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.tensor([0.0, 500.0, 999.0])[:batch]
    y = torch.tensor([0, 3, model.config.num_classes])[:batch]
    return x, t, y


def _same_outputs(a, b):
    with torch.no_grad():
        return torch.equal(a(*_inputs(a)), b(*_inputs(a)))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- our format and official checkpoints ---------------------------------------------------------

def test_save_load_model_round_trip(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "model")
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.config == tiny_dit.config
    assert _same_outputs(tiny_dit, loaded)


def test_official_state_dict_loads(tiny_latent_dit, tmp_path):
    torch.save(tiny_latent_dit.state_dict(), tmp_path / "DiT-tiny.pt")
    loaded = load_official(tmp_path / "DiT-tiny.pt", "DiT-XL/2", **TINY_LATENT)
    assert loaded.config.input_size == 8  # read off the position embedding, not the 256px default
    assert _same_outputs(tiny_latent_dit, loaded)


def test_official_training_checkpoint_loads_ema(tiny_latent_dit, tmp_path):
    """train.py saves model, EMA, optimizer and its argparse args; the EMA weights are the ones to load."""
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in tiny_latent_dit.state_dict().items()}
    optimizer = torch.optim.AdamW(tiny_latent_dit.parameters())
    checkpoint = {"model": raw, "ema": tiny_latent_dit.state_dict(), "opt": optimizer.state_dict(),
                  "args": argparse.Namespace(model="DiT-XL/2", image_size=64)}
    torch.save(checkpoint, tmp_path / "0050000.pt")
    loaded = load_official(tmp_path / "0050000.pt", "DiT-XL/2", **TINY_LATENT)
    assert _same_outputs(tiny_latent_dit, loaded)


# --- diffusers ------------------------------------------------------------------------------------

@pytest.fixture
def diffusers_dit(tmp_path):
    """A tiny random DiTTransformer2DModel saved with save_pretrained, as the Hub's conversion lays it out.

    Every weight is random (adaLN-Zero would otherwise hide mistakes behind zeros) and, as in the
    converted official checkpoints, every block carries the same timestep/class embedder.
    """
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**DIFFUSERS_TINY).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    model.save_pretrained(tmp_path / "transformer")
    return model, tmp_path / "transformer"


def test_diffusers_conversion_matches_diffusers_forward(diffusers_dit):
    reference, folder = diffusers_dit
    ours = load_diffusers(folder)
    x, t, y = _inputs(ours)
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert (expected - got).abs().max() < 1e-5
    # diffusers' MLP norm runs at its norm_eps (1e-5), its other norms at 1e-6; a shared eps is off by ~1.6e-5 here
    assert [block.norm2.eps for block in ours.blocks] == [1e-5, 1e-5]
    assert torch.allclose(reference.pos_embed.pos_embed, ours.pos_embed, atol=1e-6)  # the buffer we recompute


def test_diffusers_weights_file_and_pipeline_folder_load(diffusers_dit):
    _, folder = diffusers_dit
    from_file = load_diffusers(folder / "diffusion_pytorch_model.safetensors")
    from_pipeline = load_diffusers(folder.parent)  # DiTPipeline.save_pretrained keeps it in transformer/
    assert _same_outputs(from_file, from_pipeline)


def test_diffusers_config_maps_every_convention():
    config = config_from_diffusers({"_class_name": "Transformer2DModel", **DIFFUSERS_TINY})
    assert (config.hidden_size, config.depth, config.num_heads, config.input_size) == (64, 2, 4, 8)
    assert config.learn_sigma and config.num_classes == 10 and config.class_dropout_prob > 0
    assert (config.freq_shift, config.norm_eps, config.mlp_norm_eps) == (1.0, 1e-6, 1e-5)


@pytest.mark.parametrize("setting, message", [
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine=True"),
    ({"activation_fn": "geglu"}, "activation_fn='geglu'"),
    ({"out_channels": 5}, "out_channels=5"),
    ({"_class_name": "UNet2DModel"}, "'UNet2DModel' is not a DiT"),
])
def test_diffusers_config_our_dit_cannot_express_is_refused(setting, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_diffusers({**DIFFUSERS_TINY, **setting})


def test_diffusers_diverged_block_embedders_are_refused(diffusers_dit):
    reference, _ = diffusers_dit
    state = reference.state_dict()
    state["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
    with pytest.raises(CheckpointError, match=r"per_block_embedders=True.*transformer_blocks\.1\.norm1\.emb\.timestep"):
        convert_diffusers_state_dict(state, config_from_diffusers(DIFFUSERS_TINY))


def test_diffusers_missing_and_unexpected_keys_are_named(diffusers_dit):
    reference, _ = diffusers_dit
    state = reference.state_dict()
    del state["transformer_blocks.1.attn1.to_k.weight"]
    state["transformer_blocks.1.attn2.to_q.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="missing keys: transformer_blocks.1.attn1.to_k.weight.*"
                                              "unexpected keys: transformer_blocks.1.attn2.to_q.weight"):
        convert_diffusers_state_dict(state, config_from_diffusers(DIFFUSERS_TINY))


def test_diffusers_config_of_other_size_names_the_shapes(diffusers_dit):
    _, folder = diffusers_dit
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_head_dim": 8}))
    with pytest.raises(CheckpointError, match=r"x_embedder\.proj\.weight: checkpoint \(64, 4, 2, 2\) vs model \(32,"):
        load_diffusers(folder)


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("load", [load_model, lambda p: load_official(p, "DiT-XL/2"), load_diffusers])
def test_missing_file_raises_file_not_found(load, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere.safetensors")


def test_truncated_pt_raises_checkpoint_error(tiny_latent_dit, tmp_path):
    torch.save(tiny_latent_dit.state_dict(), tmp_path / "cut.pt")
    _truncate(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_official(tmp_path / "cut.pt", "DiT-XL/2", **TINY_LATENT)


def test_truncated_safetensors_raises_checkpoint_error(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "cut")
    _truncate(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "cut")


def test_truncated_diffusers_weights_raise_checkpoint_error(diffusers_dit):
    _, folder = diffusers_dit
    _truncate(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_diffusers(folder)


def test_shape_mismatch_names_key_and_both_shapes(tiny_latent_dit, tmp_path):
    state = tiny_latent_dit.state_dict()
    state["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "bad.pt")
    expected = r"blocks\.1\.attn\.proj\.weight: checkpoint \(64, 32\) vs model \(64, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_official(tmp_path / "bad.pt", "DiT-XL/2", **TINY_LATENT)


def test_missing_and_unexpected_keys_are_named(tiny_latent_dit, tmp_path):
    state = tiny_latent_dit.state_dict()
    del state["blocks.0.mlp.fc2.bias"]
    state["blocks.0.mlp.fc3.bias"] = torch.zeros(64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.mlp\.fc2\.bias.*"
                                              r"unexpected keys: blocks\.0\.mlp\.fc3\.bias"):
        load_official(tmp_path / "bad.pt", "DiT-XL/2", **TINY_LATENT)


@pytest.mark.parametrize("name", ["DiT-XXL/2", "DiT-XL/3", "DiT-XL", "MNIST"])
def test_unknown_model_name_lists_known_names(name):
    with pytest.raises(ValueError, match=r"unknown model name .*known: DiT-S/2, .*DiT-XL/2"):
        config_for(name)


# --- model sizes ----------------------------------------------------------------------------------

PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}  # DiT paper, Table 1 (patch size 2)


def test_model_sizes_match_the_paper():
    """Counted on the meta device (no memory). With the frozen position embedding, as the official
    train.py prints it, DiT-XL/2 at 256px has 675,129,632 parameters; Table 1's millions count only the
    trainable ones (DiT-B/2: 130.3M trainable, 130.5M with pos_embed)."""
    counts, trainable = {}, {}
    for name in model_names():
        with torch.device("meta"):
            model = create_model(name)
        counts[name] = sum(p.numel() for p in model.parameters())
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["DiT-XL/2"] == 675_129_632
    assert trainable["DiT-XL/2"] == 675_129_632 - 256 * 1152  # 16x16 tokens of width 1152
    for size, millions in PAPER_MILLIONS.items():
        assert round(trainable[f"DiT-{size}/2"] / 1e6) == millions


def test_official_architecture_is_read_off_the_shapes(tmp_path):
    """`treeq ... --model X.pt` needs no architecture name: a DiT-S/8 at 64px is recognised."""
    from treeq.models.load import load
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=64, num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    loaded = load(tmp_path / "small.pt")
    assert loaded.config.to_dict() == model.config.to_dict()
    with pytest.raises(CheckpointError, match="no published DiT size"):
        torch.save(create_model("DiT-MNIST").state_dict(), tmp_path / "testbed.pt")
        load(tmp_path / "testbed.pt")

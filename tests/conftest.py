"""Shared fixtures: tiny DiTs that build in milliseconds, seeded for reproducible outputs."""
import pytest
import torch

from treeq.models.registry import create_model

torch.set_num_threads(1)  # tests are small; one thread keeps them fast beside other work


@pytest.fixture
def tiny_dit():
    """A 2-block, width-64 pixel-space DiT shaped like the testbed (1 channel, 32x32, patch 4)."""
    torch.manual_seed(0)
    model = create_model("DiT-MNIST", depth=2, hidden_size=64, num_heads=4)
    _randomize_zero_init(model)
    return model.eval()


@pytest.fixture
def tiny_latent_dit():
    """A 2-block latent DiT shaped like DiT-XL/2 (4 channels, patch 2, 1000 classes), width 64."""
    torch.manual_seed(0)
    model = create_model("DiT-XL/2", depth=2, hidden_size=64, num_heads=4, input_size=8)
    _randomize_zero_init(model)
    return model.eval()


def _randomize_zero_init(model):
    """adaLN-Zero starts every block as the identity; tests need blocks that do something."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.normal_(std=0.05)


TINY_PIPELINE_LABELS = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 7: "cock"}


def build_tiny_pipeline(folder, seed=0):
    """A saved DiTPipeline shaped like facebook/DiT-XL-2-256, tiny: a 2-block DiTTransformer2DModel with
    1000 classes (the pipeline's null class is 1000) on 8x8 latents, a 2-level AutoencoderKL (16x16
    RGB images), a DDIM scheduler and id2label in model_index.json. Its blocks keep their own random
    embedders, like a DiT trained natively in diffusers."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=4, sample_size=8,
                                        patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(std=0.1)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    pipeline = DiTPipeline(transformer.eval(), vae.eval(), scheduler)
    pipeline.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in TINY_PIPELINE_LABELS.items()}  # as the Hub's DiT repositories
    (folder / "model_index.json").write_text(json.dumps(index))
    return pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(DiTPipeline, its saved folder); shared by the tests, which must not modify the folder."""
    folder = tmp_path_factory.mktemp("pipeline") / "dit-tiny"
    return build_tiny_pipeline(folder), folder

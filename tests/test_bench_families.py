"""`treeq bench families` on the tiny pipelines only, with minimal settings (seconds): its rows' keys, the
synthetic inputs' token counts, the block-run accounting against the real scorer, and the projections'
arithmetic. Also the full-size KL VAEs of PixArt, SD3 and FLUX (8x, the published latent channels)."""
import diffusers
import pytest
import torch

from treeq.bench import families as bench
from treeq.bits import uniform_config
from treeq.models import shapes
from treeq.models.adapters import adapter_for
from treeq.models.families import FAMILIES, init_pipeline_folder
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import collect_calibration, spread_rows
from treeq.ptq.recipe import Recipe
from treeq.search.cost import cost_model
from treeq.search.estimate import BlockRunCounter, project_search
from treeq.search.objective import ModelObjective
from treeq.search.space import SearchSpace
from treeq.search.tree import tree_search

KEYS = {"family", "part", "quantity", "value", "unit", "basis", "note"}


@pytest.mark.parametrize("name, image_tokens, text_tokens, latent_channels",
                         [("pixart", 4096, 300, 4), ("sd3", 4096, 333, 16), ("flux", 4096, 256, 16)])
def test_full_kl_vaes_give_the_published_token_counts(name, image_tokens, text_tokens, latent_channels):
    """1024px through the full VAE's four stages (8x): 128x128 latents, 4,096 tokens after patch 2 (PixArt,
    SD3) or FLUX's 2x2 packing; the latent channels match the transformer's input (FLUX: 4 x 16 packed)."""
    family = FAMILIES[name]
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**family.full_vae)
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == latent_channels
    assert family.full["in_channels"] == latent_channels * (4 if name == "flux" else 1)
    assert shapes.token_counts(name, "full") == {"image_tokens": image_tokens, "text_tokens": text_tokens}
    assert shapes.token_counts(name, "tiny")["image_tokens"] == 16  # the tiny VAE is unchanged


def test_the_small_full_vae_encodes_8x_to_the_published_channels():
    vae = diffusers.AutoencoderKL(**FAMILIES["sd3"].full_vae).eval()
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 16, 8, 8)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_synthetic_inputs_give_the_token_counts_and_block_rows_have_the_keys(name):
    model = shapes.reduced_transformer(name, "tiny")
    adapter = adapter_for(model)
    state = adapter.embed(model, shapes.synthetic_inputs(name, model, 2, "tiny"))
    assert state["hidden_states"].shape[:2] == (2, model.source["image_tokens"])
    assert len(adapter.block_names(model)) == len(bench.KIND_NAMES[name])
    rows = bench.time_blocks(name, "tiny", max_seconds=5.0, rows_tried=(16,))
    assert rows and all(set(row) == KEYS and row["value"] > 0 for row in rows)
    assert len(rows) == 2 * 2 * len(bench.KIND_NAMES[name])  # fp32 and W4A4, 1 and 16 rows, per kind
    assert set(bench.block_seconds(rows)) == set(range(len(bench.KIND_NAMES[name])))


def test_rows_past_max_seconds_are_projected_linearly_from_one_row():
    rows = bench.time_blocks("pixart", "tiny", max_seconds=0.0)
    one = {row["quantity"]: row["value"] for row in rows if row["quantity"].endswith("1 row")}
    for row in rows:
        if row["quantity"].endswith("16 rows"):
            assert row["basis"] == "projected"
            assert row["value"] == pytest.approx(16 * one[row["quantity"].replace("16 rows", "1 row")])


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    model = load(init_pipeline_folder("sd3", tmp_path_factory.mktemp("bench-families") / "sd3"))
    return model, collect_calibration(model, num_images=1, num_timesteps=2)


def test_the_block_run_counter_counts_what_the_scorer_runs(tiny_sd3, monkeypatch):
    """A real tree search on the tiny SD3 through the counter: the simulated block-runs equal the
    adapter's run_blocks calls the objective made while scoring."""
    model, calibration = tiny_sd3
    quantized = quantize(model, uniform_config(model, 8, 8), Recipe(methods=("rtn",), activations="dynamic-asym",
                         switch_bits=((4, 4), (8, 8))))
    objective = ModelObjective(quantized, spread_rows(calibration, 2, model), 8, readout_blocks=1)
    objective.entering(len(objective.adapter.block_names(quantized)) - 1)  # the environment cache, filled first
    calls = []
    run_blocks = type(objective.adapter).run_blocks
    monkeypatch.setattr(type(objective.adapter), "run_blocks",
                        lambda self, *args: calls.append(args[3] - args[2]) or run_blocks(self, *args))
    counter = BlockRunCounter(objective.block_of, objective.depth, 1, scorer=objective)
    space = SearchSpace.build(objective.layers, ((4, 4), (8, 8)))
    result = tree_search(counter, space, cost_model(quantized), 6.0, queue_size=2, progress=False)
    assert counter.evaluations == result.evaluations
    assert counter.block_runs == sum(calls) > result.evaluations


def test_the_projection_is_evaluations_times_block_runs_times_block_time():
    model = shapes.meta_transformer("flux", "tiny")
    seconds = {0: 2.0, 1: 0.5}
    projection = project_search(model, lambda b, depth: 0 if b < 2 else 1, seconds, queue_size=2)
    assert projection["search_seconds"] == pytest.approx(projection["expected_evaluations"]
                                                         * projection["block_runs_per_evaluation"]
                                                         * projection["block_seconds"])
    assert projection["evaluation_seconds"] == pytest.approx(projection["block_runs_per_evaluation"]
                                                             * projection["block_seconds"])
    assert 0.5 < projection["block_seconds"] < 2.0  # run-weighted over both kinds
    assert projection["simulated_evaluations"] <= projection["expected_evaluations"]
    doubled = project_search(model, lambda b, depth: 0 if b < 2 else 1, {0: 4.0, 1: 1.0}, queue_size=2)
    assert doubled["search_seconds"] == pytest.approx(2 * projection["search_seconds"])
    rows = bench.search_projection_rows("pixart", {0: 1.0}, queue_size=2)
    assert all(set(row) == KEYS for row in rows)


def test_quantize_rows_project_flux_and_the_worker_measures_a_tiny_model():
    rows = bench.quantize_rows("flux")  # does not fit: projections only, nothing built
    assert all(set(row) == KEYS for row in rows)
    assert [row["basis"] for row in rows] == ["not run", "projected", "projected"]
    measured = bench.quantize_worker("pixart", "tiny")
    assert measured["threads"] == 1 and measured["peak_rss_gb"] > 0 and measured["resident_gb"] > 0
    assert measured["resident_gb"] == pytest.approx(bench.projected_memory("pixart", "tiny")["resident_gb"], rel=0.05)


def test_tiny_fidelity_rows(tmp_path):
    rows = bench.tiny_fidelity_rows("flux", calibration_images=1, num_samples=1, queue_size=1,
                                    calibration_rows=2, folder=tmp_path)
    assert all(set(row) == KEYS for row in rows)
    values = {row["quantity"]: row["value"] for row in rows}
    assert values["TreeQ average bits (BOPs)"] <= 4.0 + 1e-6
    assert values["uniform W4A4 PSNR vs FP"] > 0 and values["TreeQ W4A4 PSNR vs FP"] > 0

"""Recipes through quantize(): each method's step must show, composition must follow the order,
per-bit state must follow set_bits_. Every test here fails if its method's step becomes a no-op."""
import pytest
import torch

from treeq.bits import uniform_config
from treeq.quant.activations import AbsHistogram, clip_value
from treeq.ptq.apply import quantize, set_bits_
from treeq.methods.registry import parse_methods
from treeq.quant.quantizers import fake_quantize_activation, fake_quantize_weight
from treeq.ptq.recipe import Recipe


@pytest.fixture
def outlier_dit(tiny_dit):
    """The tiny DiT with outliers where DiTs have them: a few channels of the modulated attention input
    (adaLN scale rows) and a few hidden units of the MLP (fc1 rows) 15x larger, and a few input columns
    of attn.proj's weight 12x larger."""
    with torch.no_grad():
        for block in tiny_dit.blocks:
            width = block.attn.qkv.in_features
            block.adaLN_modulation[1].bias[width + 3] = 15.0    # scale_msa of channel 3: (1 + 15) x
            block.adaLN_modulation[1].bias[width + 40] = -16.0  # channel 40 flipped and amplified
            block.mlp.fc1.weight[[5, 77]] *= 15
            block.attn.proj.weight[:, [7, 30]] *= 12
    return tiny_dit


@pytest.fixture
def calibration():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn((16, 1, 32, 32), generator=generator), torch.randint(0, 1000, (16,), generator=generator),
            torch.arange(16) % 10)


def output_error(model, reference_model, calibration):
    with torch.no_grad():
        reference = reference_model(*calibration)
        return ((model(*calibration) - reference).norm() / reference.norm()).item()


def w4a4(model, methods, calibration, bits=(4, 4), **fields):
    return quantize(model, uniform_config(model, *bits), Recipe(methods=methods, **fields), calibration=calibration)


def transformed_inputs(model, name, calibration):
    """What the activation quantizer of layer `name` sees: its input after the layer's transform."""
    layer, seen = model.get_submodule(name), []
    transform = getattr(layer, "input_transform", None) or (lambda x: x)
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(transform(args[0])))
    with torch.no_grad():
        model(*calibration)
    handle.remove()
    return torch.cat(seen).flatten(0, -2)


def test_rotation_spreads_outliers_and_beats_round_to_nearest(outlier_dit, calibration):
    rtn, rotated = w4a4(outlier_dit, ["rtn"], calibration), w4a4(outlier_dit, ["hadamard"], calibration)
    ratio = {name: (x.abs().amax(-1) / x.square().mean(-1).sqrt()).mean().item() for name, x in (
        ("rtn", transformed_inputs(rtn, "blocks.0.attn.qkv", calibration)),
        ("hadamard", transformed_inputs(rotated, "blocks.0.attn.qkv", calibration)))}
    assert ratio["hadamard"] < 0.5 * ratio["rtn"]  # per-token max / rms: outliers spread over a block
    assert output_error(rotated, outlier_dit, calibration) < 0.85 * output_error(rtn, outlier_dit, calibration)


def test_smoothing_narrows_the_per_channel_range_spread(outlier_dit, calibration):
    smoothed = w4a4(outlier_dit, ["smooth"], calibration)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2"):
        spread = {}
        for label, model in (("plain", outlier_dit), ("smooth", smoothed)):
            channel_max = transformed_inputs(model, name, calibration).abs().amax(0)
            spread[label] = (channel_max.max() / channel_max.median()).item()
        assert spread["smooth"] < 0.5 * spread["plain"], name
    assert output_error(smoothed, outlier_dit, calibration) < output_error(w4a4(outlier_dit, ["rtn"], calibration),
                                                                           outlier_dit, calibration)


@pytest.mark.parametrize("methods, name", [(["lowrank"], "blocks.1.attn.proj"),
                                           (["smooth", "lowrank"], "blocks.1.mlp.fc2")])
def test_low_rank_branch_lowers_the_weight_quantization_error(outlier_dit, calibration, methods, name):
    model = w4a4(outlier_dit, methods, calibration, method_options={"lowrank": {"rank": 8}})
    layer = model.get_submodule(name)
    with torch.no_grad():
        effective = layer.fake_quantized_weight() + layer.branch.dense()  # what the layer applies
        plain = fake_quantize_weight(layer.weight + layer.branch.dense(), 4)  # same weight, no branch
        target = layer.weight + layer.branch.dense()
    assert (effective - target).norm() < 0.8 * (plain - target).norm()


def test_svdquant_decomposes_the_smoothed_weight_and_beats_plain_low_rank(outlier_dit, calibration):
    options = {"lowrank": {"rank": 4}}
    lowrank = w4a4(outlier_dit, ["lowrank"], calibration, method_options=options)
    svdquant = w4a4(outlier_dit, ["smooth", "lowrank"], calibration, method_options=options)
    layer = svdquant.get_submodule("blocks.0.attn.qkv")
    smoothed_weight = (layer.weight + layer.branch.dense()).detach()
    branch = layer.branch.dense().detach()
    # SVD after smoothing, checked by Eckart-Young: the branch has rank 4 and leaves exactly the error of the
    # best rank-4 approximation. (Its singular vectors are not compared: the fixture's 4th and 5th singular
    # values lie 0.1% apart, so float32 SVDs on different CPUs rotate them by 2e-4.)
    singular = torch.linalg.svdvals(smoothed_weight.double())
    assert torch.linalg.matrix_rank(branch.double(), rtol=1e-5) == 4
    best = singular[4:].square().sum().sqrt()
    assert (smoothed_weight - branch).double().norm() == pytest.approx(best.item(), rel=1e-4)
    assert output_error(svdquant, outlier_dit, calibration) < output_error(lowrank, outlier_dit, calibration)


def test_gptq_after_rotation_beats_rotation_alone(outlier_dit, calibration):
    rotated = w4a4(outlier_dit, ["hadamard"], calibration, bits=(3, 8))
    quarot = w4a4(outlier_dit, ["hadamard", "gptq"], calibration, bits=(3, 8))
    layer = quarot.get_submodule("blocks.0.mlp.fc1")
    assert layer.rounding == "gptq" and layer.input_transform is not None
    assert output_error(quarot, outlier_dit, calibration) < output_error(rotated, outlier_dit, calibration)


def test_asymmetric_activations_beat_symmetric_on_the_dit(outlier_dit, calibration):
    symmetric = w4a4(outlier_dit, ["rtn"], calibration, bits=(8, 4))
    asymmetric = w4a4(outlier_dit, ["rtn"], calibration, bits=(8, 4), activations="dynamic-asym")
    assert output_error(asymmetric, outlier_dit, calibration) < 0.8 * output_error(symmetric, outlier_dit, calibration)


def test_static_scales_follow_set_bits(tiny_dit, calibration):
    recipe = Recipe(methods=["hadamard"], activations="static", activation_clip="mse", switch_bits=[(4, 4)])
    model = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8), recipe, calibration=calibration)
    layer = model.get_submodule("blocks.0.mlp.fc1")
    assert set(layer.act_scales) == {4, 8} and layer.act_scales[4] > layer.act_scales[8]
    set_bits_(model, uniform_config(tiny_dit, 4, 4))
    fresh = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), recipe, calibration=calibration)
    with torch.no_grad():
        assert torch.equal(model(*calibration), fresh(*calibration))  # switched == calibrated at these bits
    with pytest.raises(ValueError, match="blocks.0.adaLN_modulation.1: no static activation scale for a_bits 3"):
        set_bits_(model, uniform_config(tiny_dit, 3, 3))


def test_gptq_codes_are_made_for_every_switch_bit(tiny_dit, calibration):
    recipe = Recipe(methods=["gptq"], switch_bits=[(3, 8), (6, 8)])
    model = quantize(tiny_dit, uniform_config(tiny_dit, 4, 8), recipe, calibration=calibration)
    assert set(model.get_submodule("blocks.1.attn.proj").rounded_weights) == {3, 4, 6}
    set_bits_(model, uniform_config(tiny_dit, 3, 8))
    direct = quantize(tiny_dit, uniform_config(tiny_dit, 3, 8), Recipe(methods=["gptq"]), calibration=calibration)
    with torch.no_grad():
        assert torch.equal(model(*calibration), direct(*calibration))
    with pytest.raises(ValueError, match="no GPTQ codes for w_bits 5"):
        set_bits_(model, uniform_config(tiny_dit, 5, 8))


def test_static_clip_choices_on_heavy_tails():
    x = torch.distributions.StudentT(2.0).sample((20000,))
    histogram = AbsHistogram(x.abs().max())
    histogram.add(x)
    errors = {}
    for clip in ("max", "percentile", "mse"):
        scale = clip_value(histogram, 4, clip, percentile=99.9) / 7
        errors[clip] = (fake_quantize_activation(x, 4, scale=torch.tensor(scale)) - x).square().mean().item()
    assert errors["mse"] < errors["percentile"] < errors["max"]


@pytest.mark.parametrize("methods, message", [
    ("lowrank,smooth", "cannot follow lowrank"), ("gptq,hadamard", "cannot follow gptq"),
    ("hadamard,smooth", "both a transform"), ("rtn,gptq", "both a rounding"), ("awq", "unknown method 'awq'"),
    ("lowrank,monarch", "both a branch")])
def test_nonsense_combinations_are_refused(methods, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(methods)


def test_recipe_options_belong_to_its_methods():
    assert Recipe(methods=["hadamard"]).method_options == {"hadamard": {}}
    assert Recipe(methods="smooth,lowrank").method_options == {"smooth": {"alpha": 0.5},
                                                               "lowrank": {"rank": 32, "ratio": 0.0}}
    with pytest.raises(ValueError, match="method smooth has no option 'rank'"):
        Recipe(methods=["smooth"], method_options={"smooth": {"rank": 3}})
    with pytest.raises(ValueError, match="does not use"):
        Recipe(methods=["hadamard"], method_options={"lowrank": {"rank": 3}})
    with pytest.raises(ValueError, match="activations"):
        Recipe(activations="per-tensor")
    recipe = Recipe(methods="hadamard,gptq", activations="dynamic-asym", switch_bits=[(3, 3)])
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("branch", ["lowrank", "monarch"])
def test_branches_at_equal_parameter_share(outlier_dit, calibration, branch):
    """Both branches sized by the same ratio hold about that share of each layer, and lower the error."""
    model = w4a4(outlier_dit, [branch], calibration, method_options={branch: {"ratio": 0.1}})
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2"):
        layer = model.get_submodule(name)
        share = sum(p.numel() for p in layer.branch.parameters()) / layer.weight.numel()
        assert 0.05 < share <= 0.1, (name, share)
    assert output_error(model, outlier_dit, calibration) < output_error(w4a4(outlier_dit, ["rtn"], calibration),
                                                                        outlier_dit, calibration)


def test_the_demo_puts_the_monarch_branch_between_transform_and_rounding():
    from treeq.demo import treeq_recipe
    recipe = treeq_recipe(Recipe(methods="hadamard,gptq", activations="dynamic-asym"), ratio=0.1)
    assert recipe.methods == ("hadamard", "monarch", "gptq") and recipe.method_options["monarch"] == {"ratio": 0.1}
    assert recipe.activations == "dynamic-asym"

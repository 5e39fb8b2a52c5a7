"""PEFT: only the branches train, the distillation loss falls, resume equals an uninterrupted run,
and the fine-tuned run folder reloads with its learned branches."""
import copy

import pytest
import torch

from treeq.bits import uniform_config
from treeq.ptq.apply import quantize
from treeq.finetune.distill import FinetuneConfig, branch_parameters, finetune_
from treeq.ptq.recipe import Recipe
from treeq.ptq.run import load_run, save_run


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(3)
    return torch.randn((64, 1, 32, 32), generator=generator).clamp(-1, 1), torch.arange(64) % 10


def student_of(tiny_dit, branch="monarch"):
    recipe = Recipe(model="unused", methods=["hadamard", branch], method_options={branch: {"ratio": 0.1}})
    return recipe, quantize(tiny_dit, uniform_config(tiny_dit, 3, 3), recipe)


def test_only_the_branches_train_and_the_loss_falls(tiny_dit, data, tmp_path):
    _, student = student_of(tiny_dit)
    frozen = {name: p.detach().clone() for name, p in student.named_parameters() if ".branch." not in name}
    before = {name: p.detach().clone() for name, p in branch_parameters(student).items()}
    losses = finetune_(student, tiny_dit, *data, FinetuneConfig(steps=30, batch_size=8, lr=3e-3), tmp_path,
                       progress=False)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert all(torch.equal(p, frozen[name]) for name, p in student.named_parameters() if name in frozen)
    assert all(not torch.equal(p, before[name]) for name, p in branch_parameters(student).items())
    assert not any(p.requires_grad for p in student.parameters())


def test_resume_equals_an_uninterrupted_run(tiny_dit, data, tmp_path):
    config = FinetuneConfig(steps=6, batch_size=4, checkpoint_every=3)
    _, whole = student_of(tiny_dit, "lowrank")
    finetune_(whole, tiny_dit, *data, config, tmp_path / "whole", progress=False)
    _, first = student_of(tiny_dit, "lowrank")
    finetune_(first, tiny_dit, *data, FinetuneConfig(steps=3, batch_size=4, checkpoint_every=3), tmp_path / "split",
              progress=False)
    _, resumed = student_of(tiny_dit, "lowrank")
    finetune_(resumed, tiny_dit, *data, config, tmp_path / "split", resume=True, progress=False)
    for name, parameter in branch_parameters(whole).items():
        assert torch.equal(parameter, branch_parameters(resumed)[name]), name
    with pytest.raises(ValueError, match="other settings"):
        finetune_(resumed, tiny_dit, *data, FinetuneConfig(steps=6, batch_size=4, lr=0.5), tmp_path / "split",
                  resume=True, progress=False)


def test_a_model_without_branches_is_refused(tiny_dit, data, tmp_path):
    student = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4))
    with pytest.raises(ValueError, match="no branch to fine-tune"):
        finetune_(student, tiny_dit, *data, FinetuneConfig(steps=1), tmp_path, progress=False)


def assert_reloads_equal(recipe, student, tiny_dit, data, tmp_path, monkeypatch):
    """The run folder of `student` reloads to the same outputs."""
    import treeq.ptq.run as run_module
    save_run(tmp_path / "run", recipe, student)
    monkeypatch.setattr(run_module, "load", lambda spec, dtype=None: copy.deepcopy(tiny_dit))  # load_run quantizes it in place
    _, loaded = load_run(tmp_path / "run")
    x, t, y = data[0][:2], torch.tensor([5, 700]), data[1][:2]
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), student(x, t, y))


def test_learned_branches_survive_the_run_folder(tiny_dit, data, tmp_path, monkeypatch):
    recipe, student = student_of(tiny_dit)
    finetune_(student, tiny_dit, *data, FinetuneConfig(steps=3, batch_size=4), tmp_path, progress=False)
    assert_reloads_equal(recipe, student, tiny_dit, data, tmp_path, monkeypatch)


def test_step_sizes_train_with_fixed_codes_and_survive_the_run_folder(tiny_dit, data, tmp_path, monkeypatch):
    from treeq.quant.statistics import quantized_layers
    recipe = Recipe(model="unused", methods=["rtn"])
    student = quantize(tiny_dit, uniform_config(tiny_dit, 3, 3), recipe)
    fresh = {name: layer.quantized_weight() for name, layer in quantized_layers(student).items()}
    weights = {name: p.detach().clone() for name, p in student.named_parameters()}
    losses = finetune_(student, tiny_dit, *data, FinetuneConfig(steps=30, batch_size=8, lr=3e-3, step_sizes=True),
                       tmp_path, progress=False)
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5])
    assert all(torch.equal(p, weights[name]) for name, p in student.named_parameters())  # the base is frozen
    for name, layer in quantized_layers(student).items():
        trained = layer.quantized_weight()
        assert layer.step_gain is None and torch.equal(trained.codes, fresh[name].codes), name
        assert not torch.equal(trained.scale, fresh[name].scale), name  # the gains went into the scales
    assert_reloads_equal(recipe, student, tiny_dit, data, tmp_path, monkeypatch)


def test_folding_the_step_gains_keeps_the_layer_output(tiny_dit):
    from treeq.quant.statistics import quantized_layers
    student = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), Recipe(model="unused", methods=["rtn"],
                                                                       group_size=8))
    layer = next(iter(quantized_layers(student).values()))
    with torch.no_grad():
        layer.train_step_sizes_().uniform_(0.5, 1.5)
        x = torch.randn(3, layer.in_features)
        before = layer(x)
        layer.fold_step_sizes_()
        assert layer.step_gain is None and torch.allclose(layer(x), before, atol=1e-5)


def test_step_sizes_is_a_switch_on_the_command_line():
    from treeq.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["finetune", "--quant", "a", "--out", "b", "--step-sizes"]).step_sizes is True
    assert parse(["finetune", "--quant", "a", "--out", "b"]).step_sizes is False

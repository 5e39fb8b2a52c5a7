"""General Monarch Branch: exact projection, structured forward == dense, shape choice, training."""
import pytest
import torch

from treeq.branches.monarch import MonarchBranch, init_monarch, monarch_shape


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def random_monarch(out_features, in_features, k_in, k_out, rank):
    """A branch with random L and R factors (any Monarch matrix of that structure)."""
    branch = MonarchBranch(in_features, out_features, k_in, k_out, rank)
    with torch.no_grad():
        branch.left.normal_(std=0.5)
        branch.right.normal_(std=0.5)
    return branch


def relative_error(weight, branch):
    return float((weight - branch.dense().detach()).norm() / weight.norm())


@pytest.mark.parametrize("out_features, in_features, k_in, k_out, rank",
                         [(48, 64, 4, 3, 2), (1000, 300, 7, 26, 1), (7, 5, 2, 3, 1), (30, 20, 1, 1, 3)])
def test_projection_recovers_a_monarch_matrix(out_features, in_features, k_in, k_out, rank):
    target = random_monarch(out_features, in_features, k_in, k_out, rank).dense().detach()
    projected = MonarchBranch.from_weight(target, k_in, k_out, rank)
    torch.testing.assert_close(projected.dense(), target, atol=1e-5, rtol=0)


def test_block_layout_matches_the_documented_convention():
    # block (i, j) = left[i][:, j-th rank columns] @ right[j][i-th rank rows]: export relies on it
    rank, branch = 2, random_monarch(12, 15, 3, 4, 2)
    dense = branch.dense().detach()
    for i in range(4):
        for j in range(3):
            block = branch.left[i][:, j * rank:(j + 1) * rank] @ branch.right[j][i * rank:(i + 1) * rank]
            torch.testing.assert_close(dense[3 * i:3 * i + 3, 5 * j:5 * j + 5], block.detach())


def test_projection_splits_singular_values_evenly():
    # sqrt(s) on each side: balanced factors keep fine-tuning well conditioned
    branch = MonarchBranch.from_weight(torch.randn(12, 15), 3, 4, 2)
    left = branch.left.detach().view(4, 3, 3, 2).norm(dim=1)           # (i, j, rank) column norms
    right = branch.right.detach().view(3, 4, 2, 5).norm(dim=3)         # (j, i, rank) row norms
    torch.testing.assert_close(left, right.transpose(0, 1))


def test_projection_beats_perturbed_factors():
    weight = torch.randn(40, 60)
    branch = MonarchBranch.from_weight(weight, 5, 4, 2)
    best = relative_error(weight, branch)
    for _ in range(10):
        perturbed = MonarchBranch(60, 40, 5, 4, 2)
        perturbed.load_state_dict(branch.state_dict())
        with torch.no_grad():
            for param in perturbed.parameters():
                param.add_(torch.randn_like(param), alpha=1e-2)
        assert relative_error(weight, perturbed) > best


@pytest.mark.parametrize("out_features, in_features, k_in, k_out, rank",
                         [(96, 384, 11, 2, 1), (1000, 300, 7, 26, 1), (7, 5, 2, 3, 1), (4608, 1152, 38, 68, 1)])
def test_forward_equals_dense(out_features, in_features, k_in, k_out, rank):
    branch = random_monarch(out_features, in_features, k_in, k_out, rank)
    x = torch.randn(2, 3, in_features)
    with torch.no_grad():
        y, dense = branch(x), branch.dense()
    assert y.shape == (2, 3, out_features)
    assert dense.shape == (out_features, in_features)
    torch.testing.assert_close(y, x @ dense.T, atol=1e-4, rtol=1e-4)


def test_parameter_count_formula():
    # 1000 x 300 in (k_in 7, k_out 26): blocks 39 x 43, n_pad 301, m_pad 1014
    branch = MonarchBranch(300, 1000, 7, 26, 3)
    assert branch.parameter_count() == 3 * (26 * 301 + 7 * 1014)
    assert branch.parameter_count() == sum(p.numel() for p in branch.parameters())
    assert branch.macs_per_token() == branch.parameter_count()
    assert "k_in=7, k_out=26, rank=3" in repr(branch)


@pytest.mark.parametrize("out_features, in_features", [(1152, 4608), (4608, 1152), (1000, 300), (96, 384), (7, 5)])
def test_odd_shapes_from_ratio(out_features, in_features):
    weight = torch.randn(out_features, in_features)
    branch = MonarchBranch.from_ratio(weight, 0.5 if out_features < 10 else 0.05)
    assert branch.dense().shape == weight.shape
    assert relative_error(weight, branch) < 1
    x = torch.randn(4, in_features)
    with torch.no_grad():
        torch.testing.assert_close(branch(x), x @ branch.dense().T, atol=1e-4, rtol=1e-4)


def test_rank_beyond_slice_refused():
    with pytest.raises(ValueError, match="rank must be an int in 1..8"):
        MonarchBranch.from_weight(torch.randn(32, 64), 4, 4, 9)  # blocks 8 x 16
    with pytest.raises(ValueError, match="rank"):
        MonarchBranch(64, 32, 4, 4, 0)


def test_all_padding_block_refused():
    with pytest.raises(ValueError, match="k_in=4 leaves a block"):
        MonarchBranch(5, 7, 4, 1, 1)  # blocks of 2 cover 5 columns with 3


def test_error_decreases_with_rank():
    weight = torch.randn(64, 96)
    errors = [relative_error(weight, MonarchBranch.from_weight(weight, 4, 4, rank)) for rank in range(1, 17)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5  # rank = block side: the structure holds any matrix


@pytest.mark.parametrize("out_features, in_features", [(1152, 4608), (96, 384), (1000, 300), (384, 384)])
@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.2])
def test_monarch_shape_at_or_just_under_ratio(out_features, in_features, ratio):
    if ratio * out_features * in_features < out_features + in_features:
        pytest.skip("below the smallest branch")
    k_in, k_out, rank = monarch_shape(out_features, in_features, ratio)
    count = MonarchBranch(in_features, out_features, k_in, k_out, rank).parameter_count()
    assert 0.9 * ratio <= count / (out_features * in_features) <= ratio


def test_monarch_shape_square_matrix_is_canonical_monarch():
    # 2 * 1024 / 32 parameters per rank-1 layer: ratio 1/16 affords exactly sqrt-sized blocks
    assert monarch_shape(1024, 1024, 1 / 16) == (32, 32, 1)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 0.01, float("nan")])
def test_zero_or_tiny_ratio_refused(ratio):
    # documented choice: below out + in parameters (zero included) there is no branch to build
    with pytest.raises(ValueError, match="attach no branch"):
        monarch_shape(96, 384, ratio)


def test_gradients_reach_both_factors():
    branch = MonarchBranch.from_weight(torch.randn(24, 40), 4, 3, 2)
    branch(torch.randn(5, 40)).square().sum().backward()
    assert branch.left.grad.abs().sum() > 0 and branch.right.grad.abs().sum() > 0


def test_bare_branch_adds_nothing_but_trains():
    branch = MonarchBranch(40, 24, 4, 3, 2)
    x = torch.randn(5, 40)
    assert torch.equal(branch(x), torch.zeros(5, 24))
    branch(x).sum().backward()
    assert branch.left.grad.abs().sum() > 0


def test_state_dict_round_trip():
    source = MonarchBranch.from_weight(torch.randn(50, 70), 6, 5, 2)
    loaded = MonarchBranch(70, 50, 6, 5, 2)
    loaded.load_state_dict(source.state_dict())
    x = torch.randn(3, 70)
    assert torch.equal(loaded(x), source(x))


def test_bfloat16_forward():
    weight = torch.randn(96, 384)
    branch = MonarchBranch.from_weight(weight.bfloat16(), 11, 2, 1)
    assert branch.left.dtype == torch.bfloat16
    x = torch.randn(2, 8, 384)
    with torch.no_grad():
        y = branch(x.bfloat16())
    assert y.dtype == torch.bfloat16
    reference = x @ MonarchBranch.from_weight(weight, 11, 2, 1).dense().detach().T
    assert float((y.float() - reference).norm() / reference.norm()) < 0.05


def test_init_projects_weight_or_residual():
    weight = torch.randn(48, 64)
    residual = weight - weight.round()  # stands in for W - Q(W)
    torch.testing.assert_close(init_monarch(weight, shape=(4, 3, 2)).dense(),
                               MonarchBranch.from_weight(weight, 4, 3, 2).dense())
    from_residual = init_monarch(weight, 0.2, residual=residual)
    torch.testing.assert_close(from_residual.dense(),
                               MonarchBranch.from_weight(residual, *monarch_shape(48, 64, 0.2)).dense())
    with pytest.raises(ValueError, match="exactly one"):
        init_monarch(weight, 0.2, shape=(4, 3, 2))

"""Pareto drop: the kept set is never dominated by a dropped point, fits the queue, and thins by a stated rule."""
import random

import pytest

from treeq.search.pareto import non_dominated_layers, pareto_drop


def dominates(p, q):
    return p[0] <= q[0] and p[1] <= q[1] and p != q


@pytest.mark.parametrize("seed", range(40))
def test_nothing_kept_is_dominated_by_anything_dropped(seed):
    rng = random.Random(seed)
    # Coarse grids make ties and duplicates, the cases a sloppy sort gets wrong.
    points = [(rng.randrange(12), rng.randrange(12) / 4) for _ in range(rng.randrange(1, 60))]
    queue_size = rng.randrange(1, 20)
    kept, dropped = pareto_drop(points, queue_size)
    assert len(kept) == min(queue_size, len(points))
    assert sorted(kept + dropped) == list(range(len(points)))
    assert not any(dominates(points[d], points[k]) for k in kept for d in dropped)


@pytest.mark.parametrize("seed", range(10))
def test_layers_match_brute_force_domination(seed):
    rng = random.Random(seed)
    points = [(rng.randrange(8), rng.randrange(8)) for _ in range(40)]
    layers = non_dominated_layers(points)
    assert sorted(i for layer in layers for i in layer) == list(range(len(points)))
    remaining = set(range(len(points)))
    for layer in layers:
        front = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining)}
        assert set(layer) == front
        remaining -= front


def test_whole_layers_fill_before_a_later_layer_is_thinned():
    front = [(0, 5.0), (1, 4.0), (2, 3.0)]
    second = [(1, 6.0), (2, 5.0), (3, 4.0), (4, 3.5), (5, 3.2), (6, 3.1)]
    kept, _ = pareto_drop(front + second, 6)
    chosen = {(front + second)[i] for i in kept}
    # The first layer whole; of the second, both cost extremes and the point nearest the middle cost
    # 3.5 (costs 3 and 4 tie; the lower cost wins).
    assert chosen == set(front) | {(1, 6.0), (3, 4.0), (6, 3.1)}


def test_thinning_keeps_extremes_and_spreads_over_cost():
    points = [(float(c), 10.0 - c) for c in range(11)]  # one front, costs 0..10
    kept, dropped = pareto_drop(points, 3)
    assert [points[i][0] for i in kept] == [0.0, 5.0, 10.0]
    kept, _ = pareto_drop(points, 1)
    assert [points[i][0] for i in kept] == [0.0]  # the cheapest keeps every budget reachable
    assert len(dropped) == 8


def test_deterministic_under_shuffling_of_equal_points():
    points = [(1, 1.0)] * 5 + [(0, 2.0), (2, 0.5)]
    assert pareto_drop(points, 3) == pareto_drop(list(points), 3)
    kept, _ = pareto_drop(points, 3)
    assert kept == [5, 0, 6]  # extremes, then the lowest index of the tied middle


def test_nan_and_bad_queue_size_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        pareto_drop([(0, float("nan"))], 2)
    with pytest.raises(ValueError, match="queue_size"):
        pareto_drop([(0, 1.0)], 0)


@pytest.mark.parametrize("seed", range(40))
def test_windowed_drop_keeps_the_window_first_and_nothing_dominated_within_it(seed):
    rng = random.Random(seed)
    points = [(rng.randrange(12), rng.randrange(12) / 4) for _ in range(rng.randrange(1, 60))]
    queue_size = rng.randrange(1, 20)
    low = rng.randrange(12)
    window = (low, low + rng.randrange(6))
    inside = lambda i: window[0] <= points[i][0] <= window[1]  # noqa: E731
    kept, dropped = pareto_drop(points, queue_size, window)
    assert len(kept) == min(queue_size, len(points))
    assert sorted(kept + dropped) == list(range(len(points)))
    # The window's points take the places first: a point outside is kept only when all inside are.
    assert not (any(not inside(k) for k in kept) and any(inside(d) for d in dropped))
    assert not any(dominates(points[d], points[k]) for k in kept for d in dropped if inside(d))
    assert pareto_drop(points, queue_size, window) == (kept, dropped)


def test_the_window_changes_what_a_front_keeps():
    points = [(float(c), 10.0 - c) for c in range(11)]  # one front, costs 0..10
    kept, _ = pareto_drop(points, 3, window=(4.0, 6.0))
    assert [points[i][0] for i in kept] == [4.0, 5.0, 6.0]  # the plain drop keeps 0, 5, 10
    kept, _ = pareto_drop(points, 4, window=(4.0, 6.0))
    assert [points[i][0] for i in kept] == [0.0, 4.0, 5.0, 6.0]  # the free place: the plain rule outside
    with pytest.raises(ValueError, match="low <= high"):
        pareto_drop(points, 3, window=(6.0, 4.0))

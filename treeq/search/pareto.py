"""Pareto drop: the step of Tree-Structured Search that shrinks a node's scored candidates back to its queue.

Both axes are minimised: cost (average bits, or any additive cost) and metric (MSE to full precision).
Only comparisons of the metric are used, so it needs to be order-preserving with quality, not additive.
"""
import math

# Bits either side of a segment's share of the budget where the tree's queues keep their places first
# (windowed_drop; measured on the testbed in docs/RESULTS.md, "budget-aware queue").
BUDGET_WINDOW = 1.0


def non_dominated_layers(points):
    """Indices of `points` [(cost, metric), ...] grouped into non-dominated layers, best layer first.

    p dominates q when p is no worse on both axes and differs from q; identical points never
    dominate each other, so duplicates share a layer. Each layer is sorted by (cost, metric, index).
    """
    for cost, metric in points:
        if math.isnan(cost) or math.isnan(metric):
            raise ValueError(f"a point has a NaN coordinate ({cost}, {metric}); map failures to +inf before sorting")
    remaining = sorted(range(len(points)), key=lambda i: (points[i], i))
    layers = []
    while remaining:
        # In (cost, metric) order only an earlier, different point can dominate a later one: it does
        # exactly when its metric is <= the later one's. So one sweep with a running minimum peels a layer.
        layer, rest, best_metric, previous = [], [], math.inf, None
        for index in remaining:
            point = points[index]
            if point != previous and previous is not None:
                best_metric = min(best_metric, previous[1])
            (rest if best_metric <= point[1] else layer).append(index)
            previous = point
        layers.append(layer)
        remaining = rest
    return layers


def pareto_drop(points, queue_size, window=None):
    """Split indices of `points` into (kept, dropped) with len(kept) <= queue_size.

    window: None, or a cost interval (low, high) where the queue's places go first (the segment's
    share of the budget, see windowed_drop); None is the rule below over every point.

    Rule: take whole non-dominated layers, best first, while they fit. The first layer that does
    not fit is thinned along the cost axis to the m free places: with m == 1 its lowest-cost point
    is kept (the cheapest candidate keeps every later budget reachable); with m >= 2 both cost
    extremes are kept and each of the other m - 2 places goes to the not yet kept point nearest in
    cost to one of m - 2 evenly spaced cost targets between the extremes (ties: lower cost, lower
    metric, lower index). Later layers are dropped. Nothing kept is then dominated by anything
    dropped: a point is never dominated from its own or a later layer.
    Both lists come back sorted by (cost, metric, index), so the result is deterministic.
    """
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
    if window is not None:
        return windowed_drop(points, queue_size, window)
    kept = []
    for layer in non_dominated_layers(points):
        free = queue_size - len(kept)
        if free <= 0:
            break
        kept += layer if len(layer) <= free else thin_by_cost([points[i] for i in layer], free, layer)
    return _split(points, kept)


def windowed_drop(points, queue_size, window):
    """The drop with the queue's places given first to points whose cost lies in `window` (low, high).

    Why: a merged segment is later combined with the rest of the network under one budget, so the
    root can only use candidates near the segment's share of it; the plain drop spreads its places over
    the whole cost range and spends most of them on costs no configuration within the budget reaches.
    When at least queue_size points lie inside, the plain drop runs on those alone; otherwise all of
    them are kept and the plain drop over the points outside fills the free places. So nothing kept is
    dominated by a dropped point of the window, and an empty window is today's rule.
    """
    low, high = window
    if not low <= high:
        raise ValueError(f"a cost window needs low <= high, got ({low}, {high})")
    inside = [i for i, (cost, _) in enumerate(points) if low <= cost <= high]
    outside = [i for i, (cost, _) in enumerate(points) if not low <= cost <= high]
    if len(inside) >= queue_size:
        kept = [inside[i] for i in pareto_drop([points[i] for i in inside], queue_size)[0]]
    else:
        free = queue_size - len(inside)
        kept = inside + ([outside[i] for i in pareto_drop([points[i] for i in outside], free)[0]] if outside else [])
    return _split(points, kept)


def thin_by_cost(layer_points, count, indices):
    """`count` of `indices` (a layer sorted by cost) spread evenly over cost, both extremes kept."""
    if count == 1:
        return [indices[0]]
    costs = [cost for cost, _ in layer_points]
    low, high = costs[0], costs[-1]
    chosen = {0, len(indices) - 1}
    for step in range(1, count - 1):
        target = low + (high - low) * step / (count - 1)
        free = (i for i in range(len(indices)) if i not in chosen)
        # The layer is sorted by (cost, metric, index), so the position breaks ties in the stated order.
        chosen.add(min(free, key=lambda i: (abs(costs[i] - target), i)))
    return [indices[i] for i in sorted(chosen)]


def _split(points, kept):
    """(kept, dropped) indices, both sorted by (cost, metric, index): the drop's deterministic order."""
    order = lambda i: (points[i], i)  # noqa: E731 (one sort key, two uses)
    kept_set = set(kept)
    return sorted(kept, key=order), sorted((i for i in range(len(points)) if i not in kept_set), key=order)

"""Early exit of a merge (a cost lever, issue 31): score a node's products best-predicted first and stop once a
whole chunk of them puts nothing into the node's queue.

A product a + b of the children's candidates is read where b is read (the merged segment ends where b ends), so
its metric is predicted as b's plus a's excess over the left queue's best, carried to b's readout by the ratio of
the two queues' best metrics (how much the environment's error grew between the two readouts). Products are
ranked by their predicted non-dominated layer over (cost, predicted metric), then by the prediction; each chunk
of the ranking is scored in product order, so consecutive candidates still share the left child's blocks.
"""
from .pareto import non_dominated_layers, pareto_drop


def predicted_order(feasible, left, right, chunk_size, protected=()):
    """`feasible` products (in product order) reordered for early exit: chunks of `chunk_size` best-predicted
    first, each in product order; products whose bits are `protected` (seeds' parts) lead."""
    split = len(left[0].bits)
    left_metric = {c.bits: c.metric for c in left}
    right_metric = {c.bits: c.metric for c in right}
    best_left, best_right = min(left_metric.values()), min(right_metric.values())
    gain = best_right / best_left if 0 < best_left < float("inf") else 1.0
    predicted = [right_metric[c.bits[split:]] + gain * (left_metric[c.bits[:split]] - best_left) for c in feasible]
    layer_of = {}
    for layer, members in enumerate(non_dominated_layers([(c.cost, p) for c, p in zip(feasible, predicted)])):
        layer_of.update(dict.fromkeys(members, layer))
    ranked = sorted(range(len(feasible)),
                    key=lambda i: (feasible[i].bits not in protected, layer_of[i], predicted[i], i))
    chunks = [sorted(ranked[first:first + chunk_size]) for first in range(0, len(ranked), chunk_size)]
    return [feasible[i] for chunk in chunks for i in chunk]


def settled(points, chunk_size, queue_size, window):
    """Whether the last whole chunk of the scored `points` [(cost, metric), ...] put nothing into the queue that
    pareto_drop keeps from all of them (never before two chunks are scored)."""
    scored = len(points)
    if scored < 2 * chunk_size or scored % chunk_size:
        return False
    kept, _ = pareto_drop(points, queue_size, window)
    return all(index < scored - chunk_size for index in kept)

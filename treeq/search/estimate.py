"""What a tree search will cost, said before it scores: block runs counted node by node, times a measured block run.

The scorer (objective.ModelObjective) runs a candidate from the block of the first layer where it
differs from the candidate before it up to its readout. In product order the first candidate of each
run sharing the left child's part starts at the segment's first block, the others at the right child's
first block; a leaf's candidates each start at its block. Budget pruning and chunk boundaries move the
count a little (fewer candidates; a chunk's first candidate starts at the segment), so it is an estimate.
"""
import statistics
import time

from .tree import expected_evaluations, scored_nodes


def tree_block_runs(space, queue_size, block_of, stop_block):
    """Blocks the tree search's scorer runs, estimated from the nodes' candidate bounds. block_of: the
    block of each layer of `space`; stop_block(start, end): where a candidate's scoring stops
    (ModelObjective's, or stop_after for a model not built)."""
    total = 0
    for node in scored_nodes(space, queue_size):
        stop, first, middle = stop_block(node.start, node.end), block_of[node.start], block_of[node.middle]
        total += node.groups * (stop - first) + (node.candidates - node.groups) * (stop - middle)
    return total


def stop_after(block_of, depth, readout_blocks):
    """stop_block of a scorer reading `readout_blocks` blocks past a segment (None: at the output)."""
    def stop_block(start, end):
        return depth if readout_blocks is None else min(depth, block_of[end - 1] + 1 + readout_blocks)
    return stop_block


def seconds_per_block(objective, repeats=3):
    """Median wall time of one block run on the objective's rows with its layers at env bits (what
    scoring costs per block on this device, dequantization included)."""
    import torch

    entering = objective.entering(0)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for state in entering:
                objective.adapter.run_blocks(objective.model, state, 0, 1)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def estimate_tree_search(objective, space, queue_size, repeats=3):
    """{evaluations, block_runs, seconds_per_block, seconds}: the estimate `treeq search` prints first."""
    block_runs = tree_block_runs(space, queue_size, objective.block_of, objective.stop_block)
    seconds = seconds_per_block(objective, repeats)
    return {"evaluations": expected_evaluations(space, queue_size), "block_runs": block_runs,
            "seconds_per_block": seconds, "seconds": block_runs * seconds}


def describe(estimate):
    """One line: 'tree search: at most 9,800 evaluations, about 30,000 block runs of 0.012 s: about 6 min'."""
    minutes = estimate["seconds"] / 60
    when = f"{minutes:.0f} min" if minutes >= 1 else f"{estimate['seconds']:.0f} s"
    return (f"tree search: at most {estimate['evaluations']:,} evaluations, about {estimate['block_runs']:,} "
            f"block runs of {estimate['seconds_per_block']:.3g} s measured here: about {when}")

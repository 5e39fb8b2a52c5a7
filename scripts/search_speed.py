"""Speed cost of dequantizing on the fly: the search's scorer on the testbed with the dequantized-weight
cache off (the default) and on, alternating in short interleaved chunks on one quantized model so that
load from other processes falls on both alike; the metrics must agree to the bit.

Two workloads, as the searches score: `segment` (a tree-search node: 64 assignments of a 5-layer
segment, environment at 4 bits, read one block later) and `full` (evolutionary/random search: whole
random configurations, scored at the output).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/search_speed.py [--chunks 6] [--per-chunk 64]
"""
import argparse
import json
import random
import statistics
import time

from treeq.bits import uniform_config
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import load_or_collect, spread_rows
from treeq.quant.linear import cache_dequantized_
from treeq.search.objective import ModelObjective
from treeq.search.run import SEARCH_RECIPE
from treeq.search.space import DEFAULT_CANDIDATES

from dataclasses import replace


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6, help="chunks per setting and workload")
    parser.add_argument("--per-chunk", type=int, default=64, help="scored candidates per chunk")
    args = parser.parse_args()
    candidates = DEFAULT_CANDIDATES[4.0]
    model = load("default")
    recipe = replace(SEARCH_RECIPE, switch_bits=tuple(sorted(set(candidates))))
    calibration = load_or_collect(model, **recipe.calibration_options())
    quantized = quantize(model, uniform_config(model, 4, 4), recipe, calibration=calibration)
    objectives = {"segment": ModelObjective(quantized, spread_rows(calibration, 16), 4, readout_blocks=1),
                  "full": ModelObjective(quantized, spread_rows(calibration, 16), 4)}
    layers = len(objectives["full"].layers)
    rng = random.Random(0)
    report = {}
    for workload, objective in objectives.items():
        times, metrics = {False: [], True: []}, {False: [], True: []}
        for chunk in range(args.chunks):
            if workload == "segment":
                start = rng.randrange(0, layers - 5)
                span = (start, start + 5)
            else:
                span = (0, layers)
            assignments = [[rng.choice(candidates) for _ in range(span[1] - span[0])] for _ in range(args.per_chunk)]
            if workload == "segment":
                assignments.sort()  # product order, as the tree search scores a node
            for cache in ((False, True) if chunk % 2 == 0 else (True, False)):
                cache_dequantized_(quantized, cache)
                started = time.perf_counter()
                metrics[cache] += objective.score(*span, assignments)
                times[cache].append(time.perf_counter() - started)
        assert metrics[False] == metrics[True], f"{workload}: cache on and off disagree"
        per = {cache: 1e3 * statistics.median(t) / args.per_chunk for cache, t in times.items()}
        report[workload] = {"candidates_per_setting": args.chunks * args.per_chunk,
                            "ms_per_candidate_cache_off": round(per[False], 2),
                            "ms_per_candidate_cache_on": round(per[True], 2),
                            "off_over_on": round(per[False] / per[True], 3),
                            "total_seconds_off": round(sum(times[False]), 1),
                            "total_seconds_on": round(sum(times[True]), 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

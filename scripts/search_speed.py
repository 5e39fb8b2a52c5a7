"""Speed cost of dequantizing on the fly: the same testbed search with the dequantized-weight cache off
(the default) and on, rounds interleaved; the two must agree to the bit (same best configuration and
metric), since the forward's weight is the same float tensor either way.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/search_speed.py [--method random] [--evaluations 300] [--rounds 2]
"""
import argparse
import json
import tempfile

import treeq.quant.linear as linear_module
from treeq.search.run import run_search


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="random")
    parser.add_argument("--target", default="W4A4")
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    seconds, results = {False: [], True: []}, {}
    for _ in range(args.rounds):
        for cache in (False, True):
            linear_module.CACHE_DEQUANTIZED = cache
            with tempfile.TemporaryDirectory() as folder:
                result = run_search(target=args.target, method=args.method, evaluations=args.evaluations,
                                    out=f"{folder}/bits.json", progress=False)
            seconds[cache].append(round(result.seconds, 2))
            results.setdefault(cache, (result.config, result.metric, result.evaluations))
    assert results[False] == results[True], "cache on and off disagree"
    best = {cache: min(times) for cache, times in seconds.items()}
    print(json.dumps({"method": args.method, "target": args.target, "evaluations": results[False][2],
                      "metric": results[False][1], "seconds_cache_off": seconds[False],
                      "seconds_cache_on": seconds[True], "slowdown_off_vs_on": round(best[False] / best[True], 3)},
                     indent=1))


if __name__ == "__main__":
    main()

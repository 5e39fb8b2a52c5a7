"""The best search metric a sampling search (evolutionary, random) had reached after N evaluations, from its log.

Each line of a search's `.log.jsonl` is one scored configuration in the order it was scored, so the
running minimum is what the same search, seeded alike, would have returned with a budget of N
evaluations (evolutionary search generates the same candidates whatever its budget; only the last
generation is cut short). Prints JSON rows {log, evaluations, best_metric}.

    python scripts/anytime.py runs/bench-search-deep/W4A4-evo.log.jsonl --at 2302,5000,10000,23179
"""
import argparse
import json


def best_after(log, counts):
    """{count: lowest metric among the first `count` scored configurations} for the counts the log reaches."""
    wanted, best, reached = sorted(counts), float("inf"), {}
    with open(log) as lines:
        for index, line in enumerate(lines, start=1):
            best = min(best, json.loads(line)["metric"])
            if index in wanted:
                reached[index] = best
    return reached


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--at", default="100,1000,2302,5000,10000,23179", help="evaluation counts, comma-separated")
    args = parser.parse_args()
    counts = [int(count) for count in args.at.split(",")]
    rows = [{"log": log, "evaluations": count, "best_metric": metric}
            for log in args.logs for count, metric in best_after(log, counts).items()]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

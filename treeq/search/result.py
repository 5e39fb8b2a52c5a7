"""What every search method of the harness returns: the chosen bit configuration and how it was found."""
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    method: str
    config: dict                 # layer name -> {"w_bits", "a_bits"}: the chosen configuration
    average_bits: float          # of `config` under the search's cost model
    metric: float                # of `config` as the scorer measured it (lower is better)
    evaluations: int             # scored candidates (full configurations or segments)
    seconds: float               # wall time, summed over interrupted and resumed runs
    # Tree search only: the root's non-dominated candidates, and per tree level the node records
    # (segment, kept and dropped (average bits, metric) points) that plots.py draws.
    front: list = field(default_factory=list)
    levels: list = field(default_factory=list)

    def summary(self):
        """JSON-ready figures of the run (no configs, no per-level points)."""
        return {"method": self.method, "average_bits": self.average_bits, "metric": self.metric,
                "evaluations": self.evaluations, "seconds": self.seconds, "front_size": len(self.front)}

"""Crash-safe bookkeeping of a tree search: the state file (finished nodes) and the log of scored candidates.

The state is rewritten atomically after every finished node and after every scored chunk of the node
in progress (its metrics so far), so an interrupted search resumes at the first candidate it had not
scored and, with a deterministic scorer, ends in the identical result. Log lines of
a node are appended only once the node is finished, and a resume drops lines of unfinished nodes,
so the log of a resumed run equals the log of an uninterrupted one.
"""
import json
from pathlib import Path

from ..io import atomic_write

STATE_FORMAT = 1


class SearchState:
    """Finished nodes keyed "level/index", the evaluation count and the elapsed seconds of earlier runs.

    Only the writer (rank 0 of a distributed search) touches files; the others keep the same state in memory.
    """

    def __init__(self, settings, path=None, log_path=None, resume=False, writer=True):
        self.settings = settings
        self.path = None if path is None else Path(path)
        self.log_path = None if log_path is None else Path(log_path)
        self.writer = writer
        self.nodes, self.evaluations, self.seconds = {}, 0, 0.0
        self.partial = None  # {"node": "level/index", "metrics": [...]}: the node in progress, scored so far
        if resume and self.path is not None:
            if not self.path.exists():
                raise FileNotFoundError(f"nothing to resume: no {self.path}; run without --resume to start afresh")
            self._load()
        if self.writer and self.log_path is not None:
            self._trim_log()

    def node(self, level, index):
        return self.nodes.get(f"{level}/{index}")

    def scored_so_far(self, level, index):
        """Metrics of the first candidates of node (level, index) that an interrupted run had scored."""
        if self.partial is not None and self.partial["node"] == f"{level}/{index}":
            return list(self.partial["metrics"])
        return []

    def save_progress(self, level, index, metrics):
        """Keep the metrics scored so far in the node in progress (after each chunk of candidates)."""
        self.partial = {"node": f"{level}/{index}", "metrics": list(metrics)}
        self._write()

    def finish(self, level, index, record, log_lines, evaluations, seconds):
        """Store a finished node: log lines first, then the state (a crash between them repeats the node's lines
        in the log only until the resume trims them)."""
        self.nodes[f"{level}/{index}"] = record
        self.evaluations, self.seconds, self.partial = evaluations, seconds, None
        if not self.writer:
            return
        if self.log_path is not None and log_lines:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as log:
                log.writelines(json.dumps(line) + "\n" for line in log_lines)
        self._write()

    def _write(self):
        if not self.writer or self.path is None:
            return
        text = json.dumps({"format": STATE_FORMAT, "settings": self.settings, "nodes": self.nodes,
                           "evaluations": self.evaluations, "seconds": self.seconds, "partial": self.partial})
        atomic_write(self.path, lambda p: p.write_text(text))

    def _load(self):
        try:
            saved = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"search state {self.path} is not valid JSON ({error}); delete it to start over") from None
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"search state {self.path} has format {saved.get('format')!r}, expected {STATE_FORMAT}")
        # JSON turns tuples into lists; compare the settings as JSON would write them.
        if saved["settings"] != json.loads(json.dumps(self.settings)):
            changed = sorted(key for key in set(saved["settings"]) | set(self.settings)
                             if saved["settings"].get(key) != json.loads(json.dumps(self.settings.get(key))))
            raise ValueError(f"cannot resume {self.path}: it was written with other settings ({', '.join(changed)}); "
                             "run without --resume to start over")
        self.nodes, self.evaluations, self.seconds = saved["nodes"], saved["evaluations"], saved["seconds"]
        self.partial = saved.get("partial")

    def _trim_log(self):
        """Start the log afresh, or keep only the lines of nodes the loaded state holds."""
        if not self.log_path.exists():
            return
        lines = []
        if self.nodes:
            for line in self.log_path.read_text().splitlines():
                try:
                    node = json.loads(line)["node"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by the interruption
                if f"{node[0]}/{node[1]}" in self.nodes:
                    lines.append(line + "\n")
        atomic_write(self.log_path, lambda p: p.write_text("".join(lines)))


class LoggedScorer:
    """Wraps a scorer and appends a JSON line per scored candidate: the log of the baselines, which keep no
    tree state (node is null). `cost` converts a segment's summed cost to average bits; rank 0 writes."""

    def __init__(self, scorer, space, cost, log_path, writer=True):
        self.scorer, self.space, self.cost, self.writer = scorer, space, cost, writer
        self.log_path = Path(log_path)
        if writer:
            atomic_write(self.log_path, lambda p: p.write_text(""))

    @property
    def settings(self):
        return getattr(self.scorer, "settings", None)

    def score(self, start, end, assignments):
        metrics = list(self.scorer.score(start, end, assignments))
        if self.writer:
            layers = self.space.layers[start:end]
            with self.log_path.open("a") as log:
                for bits, metric in zip(assignments, metrics):
                    average = self.cost.segment_average(self.cost.assignment_cost(layers, bits), layers)
                    line = {"node": None, "segment": [start, end], "config": self.space.config(bits, start),
                            "cost": average, "metric": float(metric)}
                    log.write(json.dumps(line) + "\n")
        return metrics

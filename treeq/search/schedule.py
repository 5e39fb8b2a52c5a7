"""What a tree node keeps and scores on, by level: the levers that cut a search's cost (issue 31).

Most of a tree search's candidates are scored at its low levels, where a segment is a few layers of one
block. A schedule lets those levels keep a shorter queue (`low_queue`: fewer products to score one level up)
and score fewer calibration rows (`low_rows`: each candidate costs less), while the levels above keep the full
queue and every row, the root included. Plain ints still mean "queue_size at every level, every row".
"""
from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    """queue_size: the queue of every node at or above `low_levels`; the levels below keep `low_queue` (None:
    queue_size) and score `low_rows` rows (None: every scored row). The root is never a low level."""
    queue_size: int = 16
    low_levels: int = 0
    low_queue: int | None = None
    low_rows: int | None = None

    def __post_init__(self):
        for name in ("queue_size", "low_queue", "low_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.low_levels, bool) or not isinstance(self.low_levels, int) or self.low_levels < 0:
            raise ValueError(f"low_levels must be an int >= 0, got {self.low_levels!r}")

    def is_low(self, level, num_levels):
        """Whether `level` of a tree with `num_levels` levels is a low one (the root never is)."""
        return level < min(self.low_levels, num_levels - 1)

    def queue(self, level, num_levels):
        return self.low_queue if self.low_queue and self.is_low(level, num_levels) else self.queue_size

    def is_plain(self):
        """Whether every level keeps queue_size and scores every row: low levels that change nothing (the default
        search's) make the same search as none, and its state resumes like one."""
        return self.low_levels == 0 or (self.low_queue in (None, self.queue_size) and self.low_rows is None)

    def to_dict(self):
        return asdict(self)


def as_schedule(queue):
    """A Schedule from a schedule or a plain queue size."""
    return queue if isinstance(queue, Schedule) else Schedule(queue_size=queue)


def block_levels(block_of):
    """Levels whose segments (2**level layers) fit in the smallest block of layers: the default low levels, so
    the split scales with the model's blocks (a DiT block's 6 linears: 3 levels; FLUX's single blocks too)."""
    smallest = min(Counter(block_of).values())
    return smallest.bit_length()  # 2**(levels - 1) <= smallest


def model_schedule(model, layers, queue_size=16, low_levels=None, low_queue=None, low_rows=None):
    """The Schedule of a search over `layers` of `model`: low_levels None = block_levels of its blocks."""
    if low_levels is None:
        from ..models.adapters import adapter_for

        blocks = adapter_for(model).block_of(model)
        low_levels = block_levels([blocks[name] for name in layers])
    return Schedule(queue_size, low_levels, low_queue, low_rows)

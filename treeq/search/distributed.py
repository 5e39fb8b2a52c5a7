"""Split the scoring of a node's candidates across torch.distributed ranks (gloo on CPU, NCCL on GPU).

Every rank runs the same search; each scores a contiguous share of every batch of assignments and an
all-gather puts the metrics back in order, so every rank holds the same queues and the same result.
Files are written by rank 0 only (tree_search's `writer` default).
"""
import torch
import torch.distributed as dist


class DistributedScorer:
    """Wraps a scorer: score() on every rank returns the full, ordered list of metrics."""

    def __init__(self, scorer, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DistributedScorer needs torch.distributed initialised (init_process_group)")
        self.scorer = scorer
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        self.device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                       else torch.device("cpu"))

    @property
    def settings(self):
        """The wrapped scorer's settings: a search resumes across world sizes, since the split changes no metric."""
        return getattr(self.scorer, "settings", None)

    def score(self, start, end, assignments):
        parts = contiguous_shares(assignments, self.world_size)
        mine, share = parts[self.rank], len(parts[0])
        local = torch.full((share,), float("nan"), dtype=torch.float64, device=self.device)
        if mine:
            local[:len(mine)] = torch.tensor([float(m) for m in self.scorer.score(start, end, mine)],
                                             dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        return torch.cat(gathered)[:len(assignments)].tolist()


def contiguous_shares(items, count):
    """`items` in `count` contiguous shares of ceil(len / count), the last ones shorter or empty: consecutive
    candidates stay together, so a share shares their first blocks (the ranks' split and the workers')."""
    share = -(-len(items) // count)
    return [items[index * share:(index + 1) * share] for index in range(count)]

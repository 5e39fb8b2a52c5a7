"""Score a node's candidates in forked worker processes on the CPU, one thread each.

At the testbeds' size a block run is a few small matmuls, which keep a second thread of the same process
busy only part of the time (a small 12-block search: 1.2-1.3x faster on two threads than on one) while two
one-thread processes score 1.7x faster than two threads (docs/RESULTS.md). The workers are forked once the
model is quantized and the scorer has cached its states, so they start with all of it as it is (pages shared
copy-on-write: nothing is loaded, calibrated or quantized again, no second copy of the weights); each scores a
contiguous share of a call's candidates (consecutive candidates share their first blocks) and the metrics come
back in order. Forking needs a process that has not started CUDA: on GPUs, torchrun's ranks split the
candidates instead (search/distributed.py).
"""
import multiprocessing
import os
import signal
import traceback

import torch

from .distributed import contiguous_shares

# Free memory a worker may take is this many states of the scorer's rows (a block's activations, its MLP's
# four-times-wider hidden tokens among them); `auto_workers` keeps that within half the free memory.
STATES_PER_WORKER = 16
# `auto` stops here: the tree scores chunks of 64 candidates and each worker's share restarts at its segment
# (2 workers ran 0.3% more block runs than one process on the deep testbed); shares of 8 keep most of the
# sharing between consecutive candidates. A larger --workers is taken as given.
MAX_AUTO_WORKERS = 8


class ForkedPool:
    """`workers` processes (this one and workers - 1 forks) that score `scorers`' candidates, `threads`
    threads each; this process runs at `threads` until close(). Use as a context manager."""

    def __init__(self, scorers, workers, threads=1):
        if workers < 2:
            raise ValueError(f"a pool needs at least 2 workers, got {workers}")
        self.scorers, self.workers = list(scorers), workers
        self.scored = [0] * workers  # candidates each process scored: the split, visible to tests and logs
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)  # before warming: the states the workers inherit are computed as theirs
        for scorer in self.scorers:
            getattr(scorer, "warm", lambda: None)()
        context = multiprocessing.get_context("fork")
        self._connections, self._processes = [], []
        for _ in range(workers - 1):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, self.scorers, threads), daemon=True)
            process.start()
            theirs.close()
            self._connections.append(mine)
            self._processes.append(process)

    def scorer(self, index):
        """A scorer of `scorers[index]` whose candidates this pool splits."""
        return PooledScorer(self, self.scorers[index], index)

    def score(self, index, start, end, assignments):
        """scorers[index].score over the workers: metrics in the order of `assignments`."""
        parts = contiguous_shares(assignments, self.workers)
        shares = list(zip(self._connections, parts[1:]))
        sent = [bool(part) and _send(connection, (index, start, end, part)) for connection, part in shares]
        scorer = self.scorers[index]
        try:
            metrics = list(scorer.score(start, end, parts[0])) if parts[0] else []
        finally:  # every sent share is received, so a later call never reads this one's replies
            replies = [("ok", [], 0) if not part else _receive(connection) if was_sent else ("error", _GONE, 0)
                       for (connection, part), was_sent in zip(shares, sent)]
        for worker, (status, value, block_runs) in enumerate(replies, 1):
            if status != "ok":
                raise RuntimeError(f"search worker {worker} failed:\n{value}")
            metrics += value
            if hasattr(scorer, "block_runs"):
                scorer.block_runs += block_runs
        for worker, part in enumerate(parts):
            self.scored[worker] += len(part)
        return metrics

    def close(self):
        for connection in self._connections:
            _send(connection, None)
            connection.close()
        for process in self._processes:
            process.join()
        self._connections, self._processes = [], []
        torch.set_num_threads(self._threads_before)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PooledScorer:
    """One scorer of a ForkedPool: score() splits the candidates, `settings` are the wrapped scorer's (a search
    resumes across worker counts: the split changes no metric)."""

    def __init__(self, pool, scorer, index):
        self.pool, self.scorer, self.index = pool, scorer, index

    @property
    def settings(self):
        return getattr(self.scorer, "settings", None)

    def score(self, start, end, assignments):
        return self.pool.score(self.index, start, end, assignments)


_GONE = "the worker exited without replying (killed, or out of memory?)"


def _send(connection, message):
    """Send to a worker; False where it is gone (its reply then says so)."""
    try:
        connection.send(message)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _receive(connection):
    try:
        return connection.recv()
    except (EOFError, ConnectionResetError):
        return ("error", _GONE, 0)


def _serve(connection, scorers, threads):
    """A worker's loop: score the shares it is sent until told to stop (None) or its parent is gone. Ctrl-C
    reaches the whole process group: the parent alone handles it (it keeps what was scored and closes the pool),
    so a worker ignores it and finishes its share."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        index, start, end, assignments = message
        scorer = scorers[index]
        before = getattr(scorer, "block_runs", 0)
        try:
            metrics = [float(metric) for metric in scorer.score(start, end, assignments)]
            connection.send(("ok", metrics, getattr(scorer, "block_runs", 0) - before))
        except Exception:  # the parent raises it with this traceback
            connection.send(("error", traceback.format_exc(), 0))


def auto_workers(state_bytes, device):
    """Worker processes `--workers auto` runs: one per thread torch would use (OMP_NUM_THREADS, else the cores),
    at most MAX_AUTO_WORKERS and as many as half the free memory holds at STATES_PER_WORKER states of
    `state_bytes` each; one on a GPU or under torchrun (their ranks split the candidates), where processes
    cannot fork, or where free memory is unknown."""
    if (torch.device(device).type != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) > 1
            or "fork" not in multiprocessing.get_all_start_methods()):
        return 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1
    fits = int(free / 2 // max(1, STATES_PER_WORKER * state_bytes))
    return max(1, min(torch.get_num_threads(), MAX_AUTO_WORKERS, fits))

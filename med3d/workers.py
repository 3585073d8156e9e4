"""Worker processes that end with the process that started them.

A ``ProcessPoolExecutor`` worker whose parent is killed (SIGKILL, the OOM killer) does not notice:
it finishes its case and then waits for the next one forever, holding memory and files. Workers
here are started with ``spawn``, so they are the starting process's own children, and each asks
the kernel to kill it when that parent dies (Linux ``PR_SET_PDEATHSIG``). The kernel's signal is
what makes this hold: a watcher thread in the worker could not run while a long numpy or scipy
call holds the GIL. (Under ``forkserver`` the workers' parent would be the fork server, which
lives as long as any worker does, so it cannot be the signal's source.)
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, List, Sequence

_PR_SET_PDEATHSIG = 1


def _die_with(owner: int) -> None:
    """Worker initializer: have the kernel kill this worker when ``owner``, its parent, dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != owner:  # the owner died before the request above took effect: nobody wants the results
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers stop when this process stops, however it stops (on Linux).

    Args:
        workers: the number of worker processes.

    Returns:
        The pool (use it as a context manager).
    """
    # spawn, not fork: forking a process whose torch/tqdm threads hold a lock can hang a worker.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with, initargs=(os.getpid(),))


# Jobs per worker below which a pool costs more than it saves: each spawned worker first imports
# torch and MONAI (about 2 s), while a small case reads and resamples in well under a second.
MIN_JOBS_PER_WORKER = 4


def worth_a_pool(workers: int, jobs: int) -> bool:
    """Whether ``jobs`` cases are worth starting ``workers`` processes for.

    Args:
        workers: the worker count asked for (``--workers``).
        jobs: how many cases there are.

    Returns:
        True when there is more than one worker and at least ``MIN_JOBS_PER_WORKER`` cases each.
    """
    return workers > 1 and jobs >= MIN_JOBS_PER_WORKER * workers


def map_cases(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, desc: str, progress: bool) -> List[Any]:
    """``[fn(job) for job in jobs]``, in a worker pool when it is worth one, with an optional progress bar.

    Args:
        fn: a module-level function (workers import it by name).
        jobs: its arguments, one per case.
        workers: the worker count asked for (``--workers``).
        desc: the progress bar's label.
        progress: show the bar.

    Returns:
        The results in the order of ``jobs``.
    """
    from tqdm import tqdm

    def bar(it):
        return tqdm(it, total=len(jobs), desc=desc, unit="case", disable=not progress, leave=False)

    if worth_a_pool(workers, len(jobs)):
        with worker_pool(workers) as pool:  # its workers stop with this process, even on SIGKILL
            return list(bar(pool.map(fn, jobs)))
    return [fn(job) for job in bar(jobs)]

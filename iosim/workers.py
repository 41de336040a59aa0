"""Worker processes that behave: they ignore Ctrl-C (the parent handles it, once), die with their
parent even when it is killed, and are stopped at once — not after their current job — when the
parent gives up (an error or Ctrl-C).

Every process pool of the package and the experiments comes from :func:`process_pool`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

#: Linux prctl option: the signal a process receives when its parent dies.
_PR_SET_PDEATHSIG = 1
#: How often a worker without prctl checks that its parent is still there, in seconds.
_PARENT_POLL_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), else watch for it."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)


def stop_now(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the workers (their current jobs are abandoned)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=2)


@contextlib.contextmanager
def process_pool(workers: int):
    """A ProcessPoolExecutor of ``workers`` well-behaved processes (see the module docstring).

    On a clean exit it waits for its jobs as usual; on an exception (KeyboardInterrupt
    included) it kills its workers before the exception goes on."""
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker,
                                                  initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        stop_now(pool)
        raise
    pool.shutdown(wait=True)

"""Run many independent simulations: in this process, on local worker processes, or on a Dask
cluster.

Every sweep of the package (``iosim explore``, the design-space sweep) maps a picklable
module-level function over jobs with :func:`map_jobs`. Where the jobs run:

* ``scheduler=None`` (default) and no ``DASK_SCHEDULER_ADDRESS`` in the environment: local
  worker processes (:mod:`iosim.workers`: they ignore Ctrl-C and die with their parent), or this
  process when ``workers`` is 1;
* ``scheduler="local"``: a Dask ``distributed.LocalCluster`` of ``workers`` processes started
  for the call (what a cluster run does, on one machine);
* ``scheduler="tcp://host:8786"`` (or ``DASK_SCHEDULER_ADDRESS``): the Dask scheduler at that
  address; its workers need iosim installed (``pip install -e '.[dask]'`` on each).

Results come back in the order of ``jobs``, with a tqdm bar that advances as jobs finish.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys

from .errors import IosimError

#: The environment variable that names a Dask scheduler when ``scheduler`` is not given.
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


def resolve_scheduler(scheduler: str | None) -> str | None:
    """``scheduler``, else ``DASK_SCHEDULER_ADDRESS``, else None (local worker processes);
    refuses anything that is neither "local" nor a ``tcp://``/``tls://``/``inproc://`` address."""
    scheduler = scheduler if scheduler is not None else os.environ.get(SCHEDULER_ENV) or None
    if scheduler is None or scheduler == "local":
        return scheduler
    if not isinstance(scheduler, str) or "://" not in scheduler:
        raise IosimError(f"scheduler must be 'local' or a Dask scheduler address such as "
                         f"tcp://host:8786, got {scheduler!r}")
    return scheduler


def _dask_client(scheduler: str, workers: int):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise IosimError("a Dask scheduler was asked for but Dask is not installed; "
                         "pip install 'dask[distributed]' (or iosim's [dask] extra)") from None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="10s"), None
    except OSError as exc:
        raise IosimError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None


def map_jobs(fn, jobs, *, workers: int | None = None, scheduler: str | None = None,
             progress: bool = True, desc: str = "jobs") -> list:
    """``[fn(job) for job in jobs]``, run where ``scheduler`` says (see the module docstring)."""
    from tqdm import tqdm

    from .workers import process_pool

    jobs = list(jobs)
    workers = workers or os.cpu_count() or 1
    scheduler = resolve_scheduler(scheduler)
    results = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="job", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        if scheduler is not None:
            from distributed import as_completed

            client, cluster = _dask_client(scheduler, workers)
            try:
                futures = client.map(fn, jobs, pure=False)
                index = {future.key: i for i, future in enumerate(futures)}
                for future in as_completed(futures):
                    results[index[future.key]] = future.result()
                    bar.update(1)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
        elif workers == 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = fn(job)
                bar.update(1)
        else:
            with process_pool(min(workers, len(jobs))) as pool:
                futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
    finally:
        bar.close()
    return results

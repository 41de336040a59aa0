"""Sweeps on local processes or on Dask: the same answers, and clear errors."""
import pytest

import iosim
from iosim.distribute import map_jobs, resolve_scheduler
from iosim.explore import explore

SHAPE = iosim.AttentionShape(1, 2, 256, 64)


def _square(x):
    return x * x


def test_the_same_results_in_order_everywhere():
    jobs = list(range(7))
    expected = [x * x for x in jobs]
    assert map_jobs(_square, jobs, workers=1, progress=False) == expected
    assert map_jobs(_square, jobs, workers=2, progress=False) == expected
    assert map_jobs(_square, jobs, workers=2, scheduler="local", progress=False) == expected


def test_explore_on_a_dask_cluster_ranks_as_locally(monkeypatch):
    distributed = pytest.importorskip("distributed")
    local = explore("flash2", SHAPE, workers=2, progress=False, candidates=[32, 64])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        assert resolve_scheduler(None) == cluster.scheduler_address
        remote = explore("flash2", SHAPE, workers=2, progress=False, candidates=[32, 64])
    assert [(r.block_rows, r.block_cols, r.predicted_time_s, r.hbm_bytes) for r in remote] == \
        [(r.block_rows, r.block_cols, r.predicted_time_s, r.hbm_bytes) for r in local]


def test_bad_schedulers_are_one_clear_error(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert resolve_scheduler(None) is None
    with pytest.raises(iosim.IosimError, match="scheduler must be 'local' or a Dask"):
        resolve_scheduler("somewhere")
    with pytest.raises(iosim.IosimError, match="cannot reach the Dask scheduler"):
        map_jobs(_square, [1], scheduler="tcp://127.0.0.1:9", progress=False)

"""open_client: one context manager for a running scheduler, SLURM jobs or a local cluster."""

from __future__ import annotations

import time

import pytest
from distributed import Client

from diagode_dist.service.session import open_client


def test_arguments_are_checked_before_anything_starts(tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match="n_workers, processes start a cluster here"), \
            open_client("tcp://127.0.0.1:1", n_workers=2, processes=False):
        pass
    with pytest.raises(TypeError, match="slurm must be SlurmOptions, got dict"), \
            open_client(slurm={"jobs": 1}):
        pass
    with pytest.raises(ValueError, match="n_workers must be >= 1"), open_client(n_workers=0):
        pass
    assert time.monotonic() - started < 5
    with pytest.raises(FileNotFoundError, match=r"scheduler_file: .*none\.json does not exist "
                                                r"\(waited 0\.3 s\)"), \
            open_client(scheduler_file=tmp_path / "none.json", connect_timeout=0.3):
        pass


def test_a_running_scheduler_is_used_and_left_running(cluster):
    with open_client(cluster.scheduler_address, min_workers=2, worker_timeout=30) as session:
        assert session.external and session.kind == "external" and session.n_workers == 2
        assert session.client.submit(sum, [1, 2]).result(timeout=30) == 3
    assert session.client.status == "closed"
    with Client(cluster) as again:  # the cluster itself goes on
        assert len(again.scheduler_info()["workers"]) == 2


def test_a_cluster_started_here_is_closed_on_exit():
    with open_client(n_workers=1, gpu=False, processes=False, dashboard_address=None) as session:
        assert session.kind == "LocalCluster" and not session.external
        assert session.n_workers == 1
        address = session.client.scheduler.address
    assert session.client.status == "closed"
    with pytest.raises(OSError):
        Client(address, timeout=1)


def test_a_local_cluster_serves_its_dashboard_on_this_machine_only():
    with open_client(n_workers=1, gpu=False, processes=False) as session:
        ports = session.client.run_on_scheduler(
            lambda dask_scheduler: [sock.getsockname()[0] for server in
                                    [dask_scheduler.http_server]
                                    for sock in server._sockets.values()])
    assert ports and set(ports) == {"127.0.0.1"}

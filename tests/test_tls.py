"""Dask TLS end to end: a run on a cluster that only speaks TLS, with certificates made here."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import diagode_dist as dd

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed to make certificates")


@pytest.fixture(scope="module")
def security(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1/localhost, used as CA, client, scheduler, worker."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    files = {f"tls_{who}_{kind}": str(path) for who in ("client", "scheduler", "worker")
             for kind, path in (("cert", cert), ("key", key))}
    return distributed.Security(tls_ca_file=str(cert), require_encryption=True, **files)


@pytest.mark.slow
def test_training_over_tls_matches_fit(security):
    prob = dd.demo_problem(n=32, S=16, seed=3)
    theta0 = np.zeros(prob.n)
    options = dict(epochs=2, lr=0.05, k=20, batch_size=8, seed=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  protocol="tls://", security=security,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster, security=security) as client:
        assert client.scheduler.address.startswith("tls://")
        assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
        theta, history = dd.fit_distributed(client, prob, theta0, n_shards=2, **options)
        # Without the certificates nobody gets in.
        with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
            distributed.Client(cluster.scheduler_address, timeout=3)
    expected, expected_history = dd.fit(prob, theta0, **options)
    assert np.allclose(theta, expected, rtol=1e-12, atol=0)
    assert np.allclose(history, expected_history, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_the_cli_reaches_a_tls_scheduler_with_its_tls_flags(security, capsys):
    import time

    from diagode_dist.cli import main

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tls://", security=security,
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        flags = ["--tls-ca-file", security.tls_ca_file, "--tls-cert", security.tls_client_cert,
                 "--tls-key", security.tls_client_key]
        assert main(["status", "no-such-run", "--scheduler", address, *flags]) == 1
        err = capsys.readouterr().err
        assert "the scheduler has no run 'no-such-run'" in err  # it got in and asked
        started = time.monotonic()
        assert main(["status", "no-such-run", "--scheduler", address]) == 1
        err = capsys.readouterr().err
    assert time.monotonic() - started < 5  # at once, not after Dask's connect timeout
    assert "speaks TLS" in err and "--tls-ca-file" in err and "Traceback" not in err

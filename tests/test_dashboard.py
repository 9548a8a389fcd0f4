"""The training page, its JSON and the Prometheus gauges, on a real LocalCluster.

Two runs live on one scheduler: one that has finished (its status no longer changes, so the
page, the JSON and the gauges must equal ``RunHandle.status()`` exactly) and one that keeps
running through the whole module (checked against statuses taken just before and just after
each read). The page is loaded in headless Chromium; a screenshot is kept as a test artefact
(and written to docs/dashboard.png when DIAGODE_SAVE_SCREENSHOT=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

import diagode_dist as dd
from diagode_dist.service.client import submit
from diagode_dist.service.dashboard import _route_prefix, install, without_locations
from diagode_dist.service.page import render_page
from diagode_dist.service.plugin import install as install_service

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_INSTALL = REPO / "tests" / "infra" / "chromium_install.sh"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(cluster):
    """(client, base URL of the dashboard, finished RunHandle, running RunHandle)."""
    with Client(cluster) as client:
        link = urllib.parse.urlsplit(client.dashboard_link)  # port 0: read the real one
        base = f"{link.scheme}://{link.netloc}"
        install_service(client)
        finished = submit(client, dd.demo_problem(n=32, S=16, seed=1), np.zeros(32),
                          n_shards=2, epochs=3, batch_size=8, lr=0.05, k=12,
                          run_id="dash-finished")
        finished.wait(timeout=60)
        # ~4000 steps: still running when the module ends (cancelled then)
        running = submit(client, dd.demo_problem(n=64, S=32, seed=0), np.zeros(64),
                         n_shards=2, epochs=2000, batch_size=16, lr=0.05, k=16,
                         run_id="dash-running")
        _wait_for(lambda: len(running.status()["history"]) >= 5, "5 epochs of the running run")
        yield client, base, finished, running
        running.cancel("test module done")


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def _get(url: str) -> bytes:
    with _DIRECT.open(url, timeout=10) as response:
        assert response.status == 200
        return response.read()


def _get_json(url: str) -> dict:
    return json.loads(_get(url))


def _runs_json(base: str) -> dict[str, dict]:
    body = _get_json(base + "/diagode/status.json")
    assert body["parameter_server"] is True
    return {run["run_id"]: run for run in body["runs"]}


def _sandwich(handle, read):
    """(status before, read(), status after) with no step between, retried a few times."""
    for _ in range(100):
        before = handle.status()
        value = read()
        after = handle.status()
        if before["step"] == after["step"]:
            return before, value, after
    pytest.fail("the running run advanced during every one of 100 reads")


# ---- status.json ------------------------------------------------------------------------------

def test_status_json_equals_run_handle_status_for_a_finished_run(service):
    _, base, finished, _ = service
    status = finished.status()
    assert status["status"] == "finished" and status["step"] == status["n_steps"] == 6
    assert _runs_json(base)["dash-finished"] == without_locations(status)
    assert "worker" in status["shard_timings"][0]  # the client's view keeps the addresses


def test_status_json_follows_a_running_run(service):
    _, base, _, running = service
    before, runs, _ = _sandwich(running, lambda: _runs_json(base))
    seen = runs["dash-running"]
    assert seen["status"] == "running" and 0 < seen["step"] < seen["n_steps"]
    for key in ("step", "epoch", "loss", "history", "grad_norm", "n_steps"):
        assert seen[key] == before[key], key
    assert len(seen["shard_timings"]) == 2
    assert all(t["compute_s"] > 0 for t in seen["shard_timings"])


# ---- /metrics ---------------------------------------------------------------------------------

def _samples(base: str) -> dict[tuple, float]:
    """{(metric name, run_id[, shard or status]): value} of the diagode_* gauges."""
    text = _get(base + "/metrics").decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("diagode_"):
                extra = tuple(v for k, v in sorted(sample.labels.items()) if k != "run_id")
                key = (sample.name, sample.labels["run_id"], *extra)
                assert key not in samples, f"duplicate sample {key}"
                samples[key] = sample.value
    return samples


def test_metrics_gauges_of_a_finished_run(service):
    _, base, finished, _ = service
    status, samples = finished.status(), _samples(base)
    run = "dash-finished"
    assert samples["diagode_step", run] == status["step"] == status["n_steps"]
    assert samples["diagode_loss", run] == status["loss"]
    assert samples["diagode_epoch_loss", run] == status["history"][-1]
    assert samples["diagode_grad_norm", run] == status["grad_norm"] > 0
    assert samples["diagode_step_seconds", run] == status["last_step_s"] > 0
    assert samples["diagode_run_status", run, "finished"] == 1
    for shard, timing in enumerate(status["shard_timings"]):
        assert samples["diagode_shard_compute_seconds", run, str(shard)] == timing["compute_s"]
    assert ("diagode_eta_seconds", run) not in samples  # no ETA once finished


def test_metrics_gauges_of_a_running_run(service):
    _, base, _, running = service
    before, samples, _ = _sandwich(running, lambda: _samples(base))
    run = "dash-running"
    assert samples["diagode_step", run] == before["step"]
    assert samples["diagode_loss", run] == before["loss"]
    assert samples["diagode_grad_norm", run] == before["grad_norm"]
    assert samples["diagode_run_status", run, "running"] == 1
    assert samples["diagode_steps_per_second", run] > 0
    assert samples["diagode_eta_seconds", run] > 0


def test_installing_twice_registers_routes_and_gauges_once(service):
    client, base, _, _ = service
    install_service(client)
    assert client.run_on_scheduler(_install_twice) == ["/diagode", "/diagode"]
    text = _get(base + "/metrics").decode()
    assert text.count("# TYPE diagode_step gauge") == 1
    _samples(base)  # asserts that no sample appears twice
    assert len(_runs_json(base)) == 2


def _install_twice(dask_scheduler):
    return [install(dask_scheduler), install(dask_scheduler)]


# ---- read-only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_page_and_json_refuse_every_method_but_get(service, method):
    client, base, finished, running = service
    frozen = finished.status()
    for path in ("/diagode", "/diagode/status.json", "/diagode/status.json?run=dash-running"):
        request = urllib.request.Request(base + path, data=b"status=failed&cancel=1",
                                         method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            _DIRECT.open(request, timeout=10)
        assert refused.value.code == 405, (method, path)
    assert finished.status() == frozen
    step = running.status()["step"]
    _wait_for(lambda: running.status()["step"] > step, "the running run to go on", 30)
    assert running.status()["status"] == "running"


def test_page_fetches_nothing_from_the_network(service):
    _, base, _, _ = service
    with _DIRECT.open(base + "/diagode", timeout=10) as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "<script" not in page.lower() and "src=" not in page.lower()
    for target in re.findall(r'href="([^"]*)"', page):
        assert target.startswith("/"), target  # links on this server only


# ---- headless Chromium -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM_INSTALL.exists():
        pytest.skip(f"{CHROMIUM_INSTALL} is missing")
    done = subprocess.run(["bash", str(CHROMIUM_INSTALL)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 77:
        pytest.skip(f"headless Chromium unavailable: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="diagode-chromium-") as profile:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-proxy-server", "--hide-scrollbars",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class _Fields(HTMLParser):
    """{run_id: {field: (data-value, shown text)}} from the page's run cards."""

    def __init__(self):
        super().__init__()
        self.runs: dict[str, dict[str, tuple[str, str]]] = {}
        self._run = self._field = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-run-id" in attrs:
            self._run = self.runs.setdefault(attrs["data-run-id"], {})
        elif self._run is not None and "data-field" in attrs:
            self._field = attrs["data-field"]
            self._run[self._field] = (attrs.get("data-value", ""), "")

    def handle_data(self, data):
        if self._field is not None:
            value, text = self._run[self._field]
            self._run[self._field] = (value, text + data)

    def handle_endtag(self, tag):
        if tag in ("td", "p"):
            self._field = None


@pytest.mark.browser
def test_page_in_headless_chromium_shows_step_and_loss(service, chromium):
    _, base, finished, running = service
    before = running.status()
    dom = _chromium(chromium, "--dump-dom", base + "/diagode?refresh=0").stdout
    after = running.status()
    fields = _Fields()
    fields.feed(dom)
    assert set(fields.runs) == {"dash-finished", "dash-running"}

    done, shown = finished.status(), fields.runs["dash-finished"]
    assert shown["status"][1] == "finished"
    assert shown["step"] == (str(done["step"]), f"{done['step']:,} / {done['n_steps']:,}")
    assert float(shown["loss"][0]) == done["loss"]
    assert shown["loss"][1] == f"{done['loss']:.6g}"

    live = fields.runs["dash-running"]
    step = int(live["step"][0])
    assert before["step"] <= step <= after["step"]
    assert live["step"][1].startswith(f"{step:,} / ")
    epoch = step // after["steps_per_epoch"]
    # history only grows: the page's last epoch loss is the one the run had at that epoch
    assert float(live["epoch_loss"][0]) == after["history"][epoch - 1]
    assert np.isfinite(float(live["loss"][0]))
    assert "<polyline" in dom  # the loss curve was drawn


@pytest.mark.browser
def test_page_screenshot_is_not_blank(service, chromium, tmp_path):
    _, base, _, _ = service
    shot = tmp_path / "dashboard.png"
    _chromium(chromium, f"--screenshot={shot}", "--window-size=1200,900",
              base + "/diagode?refresh=0")
    pixels = _read_png(shot)
    assert pixels.shape[:2] == (900, 1200)
    gray = pixels[..., :3].mean(axis=-1)
    assert gray.std() > 0.05  # not one flat colour
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50  # text, lines, bars
    if os.environ.get("DIAGODE_SAVE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")


def _read_png(path: Path) -> np.ndarray:
    """Pixels as floats in [0, 1], shape (height, width, channels)."""
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path), dtype=float)


# ---- the page on its own (no cluster) ----------------------------------------------------------

def _status(**changes) -> dict:
    status = {"run_id": "r1", "status": "running", "step": 3, "n_steps": 10, "epoch": 1,
              "epochs": 5, "loss": 1.25, "history": [2.0], "steps_per_s": 4.0, "error": None,
              "n": 8, "S": 4, "n_shards": 2, "batch_size": 2, "steps_per_epoch": 2,
              "grad_norm": 0.5, "last_step_s": 0.25, "mean_step_s": 0.25,
              "mean_compute_s": 0.1, "shard_timings": [{}, {}], "shard_restarts": [0, 0],
              "started": 0.0, "elapsed_s": 1.0, "eta_s": 1.75, "checkpoint": None,
              "checkpoint_step": None, "resumed_from_step": None}
    return {**status, **changes}


def test_page_escapes_run_text():
    page = render_page([_status(status="failed", error="<script>alert(1)</script> & more")])
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def test_page_without_server_or_runs_says_so():
    assert "not installed" in render_page([], installed=False)
    assert "No training runs" in render_page([], installed=True)
    assert "No training runs" not in render_page([_status()])


def test_route_prefix_follows_the_dashboard_prefix():
    from distributed.http.routing import RoutingApplication
    from distributed.http.utils import get_handlers

    for prefix, expected in (("/", "/"), ("/proxy/8787", "/proxy/8787/")):
        routes = get_handlers(server=None, modules=["distributed.http.health"], prefix=prefix)
        assert _route_prefix(RoutingApplication(routes)) == expected

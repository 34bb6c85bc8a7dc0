"""Prometheus and its Pushgateway (the Debian packages `prometheus` and `prometheus-pushgateway`) as real
processes on free loopback ports with temporary storage, for the metrics tests.

Prometheus scrapes the gateway every second with `honor_labels: true`, as a Pushgateway is meant to be scraped,
so the pushed `job` and `instance` labels are kept.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from mp_pipelines_tests.services import free_port, unavailable, wait_for


@dataclass
class Prometheus:
    url: str  # http://127.0.0.1:PORT of Prometheus
    pushgateway: str  # http://127.0.0.1:PORT of the Pushgateway

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` returns now (a list of {metric, value})."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a scalar-like query, None when it returns nothing."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, expected: float, timeout: float = 60) -> None:
        """Wait until `promql` returns `expected` (Prometheus scrapes the gateway every second)."""
        wait_for(lambda: self.value(promql) == expected, timeout, f"{promql} to return {expected}",
                 diagnostics=lambda: f"it returns {self.value(promql)}")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed: apt-get install -y {name} (.ci/run installs it)")
    return path


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def prometheus_with_pushgateway(folder: Path) -> Iterator[Prometheus]:
    """Start the Pushgateway and a Prometheus that scrapes it; stop both on exit."""
    gateway_port, prometheus_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{gateway_port}"
    config = folder / "prometheus.yml"
    config.write_text(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["127.0.0.1:{gateway_port}"]}}]
""")
    (folder / "tsdb").mkdir()
    processes = []
    with open(folder / "pushgateway.log", "wb") as gateway_log, open(folder / "prometheus.log", "wb") as logs:
        try:
            processes.append(subprocess.Popen([_binary("prometheus-pushgateway"),
                                               f"--web.listen-address=127.0.0.1:{gateway_port}"],
                                              stdout=gateway_log, stderr=subprocess.STDOUT))
            processes.append(subprocess.Popen([_binary("prometheus"), f"--config.file={config}",
                                               f"--storage.tsdb.path={folder / 'tsdb'}",
                                               f"--web.listen-address=127.0.0.1:{prometheus_port}",
                                               "--web.enable-lifecycle"], stdout=logs, stderr=subprocess.STDOUT))
            service = Prometheus(f"http://127.0.0.1:{prometheus_port}", gateway)
            wait_for(lambda: _answers(f"{gateway}/-/ready") and _answers(f"{service.url}/-/ready"), 60,
                     "Prometheus and the Pushgateway to be ready")
            wait_for(lambda: service.value('up{job="pushgateway"}') == 1 or None, 60,
                     "Prometheus to scrape the Pushgateway")
            for process, log in zip(processes, (folder / "pushgateway.log", folder / "prometheus.log")):
                if process.poll() is not None:  # e.g. its port was taken meanwhile: something else answered
                    raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
            yield service
        finally:
            for process in processes:
                _stop(process)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False

"""The Grafana dashboard of deploy/grafana/: well-formed, every panel in its own place, and
every metric it queries served on /metrics by a real worker process that consumed a
simulated stream (alert episodes, test events and a malformed record among it)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
from kinesis_support import create_stream, put
from prometheus_client.parser import text_string_to_metric_families

from worker.devtools.local_servers import free_port
from worker.devtools.simulator import SimulationOptions, generate
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "supersim-worker.json"
GRID_COLUMNS = 24
METRIC = re.compile(r"supersim_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
"""What the text format adds to a family's name for its samples."""

HANDLERS = "metering,rejections,data_limit,attach_loops"
STREAM = SimulationOptions(
    sims=40,
    hours=1,
    seed=1313,
    fleets=1,
    outage=True,
    failure_bursts=True,
    data_limit_share=0.1,
    attach_loop_share=0.1,
    test_events=2,
)
"""Rejection storms, a fleet outage, failure bursts, data-limit blocks (still open at the
end) and attach loops: every alert kind opens, most resolve. About 550 records."""
MALFORMED = b"not a cloud event"
"""Fails to decode: a decode error and a dead letter."""
SCRAPE_WITHIN_S = 30.0

NO_SAMPLE_YET = {
    "supersim_handler_failures_total": "needs a handler that raises",
    "supersim_handler_timeouts_total": "needs a handler slower than SUPERSIM_HANDLER_TIMEOUT",
    "supersim_handler_outages_total": "needs a handler that reports itself unavailable",
    "supersim_get_records_throttles_total": "needs Kinesis to throttle GetRecords",
    "supersim_get_records_retries_total": "needs a retriable GetRecords error",
    "supersim_iterators_expired_total": "needs a shard iterator to expire (5 minutes)",
}
"""Queried by the dashboard but labelled and not moved by a healthy run: a scrape declares
them (``# HELP``/``# TYPE``) with no sample until they first move."""


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def exprs() -> list[str]:
    """Every PromQL query: the panels' targets and the template variables' queries."""
    queries = [target["expr"] for panel in panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def queried() -> set[str]:
    """Every metric name the queries name, as written (``supersim_x_total``, ``..._bucket``)."""
    return {name for expr in exprs() for name in METRIC.findall(expr)}


def family(name: str) -> str:
    """The family a sample name belongs to, as the Prometheus parser reports it."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_the_dashboard_is_grafana_json_with_unique_panel_ids_and_places() -> None:
    """The dashboard parses, has a Prometheus data-source variable, and each panel has its
    own id and its own rectangle on the 24-column grid."""
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "supersim-worker"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    all_panels = panels()
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in all_panels:
        place = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= place.keys(), panel["title"]
        assert all(isinstance(place[key], int) for key in "xywh"), panel["title"]
        assert min(place["x"], place["y"]) >= 0, panel["title"]
        assert min(place["w"], place["h"]) > 0, panel["title"]
        assert place["x"] + place["w"] <= GRID_COLUMNS, panel["title"]
    for a, b in itertools.combinations(all_panels, 2):
        assert not overlap(a["gridPos"], b["gridPos"]), f"{a['title']!r} overlaps {b['title']!r}"


def test_every_query_uses_the_datasource_variable_and_the_job_and_namespace_filters() -> None:
    """Each target reads the chosen data source, and each metric it selects is limited to the
    chosen jobs and namespaces."""
    for panel in panels():
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            selectors = re.findall(r"supersim_[a-z_]+(\{[^}]*\})?", target["expr"])
            assert selectors, target["expr"]
            for selector in selectors:
                assert 'job=~"$job"' in selector, target["expr"]
                assert 'namespace=~"$namespace"' in selector, target["expr"]


def test_every_metric_the_worker_registers_has_a_panel() -> None:
    """No metric of worker.metrics is left off the dashboard."""
    registered = {metric.name for metric in Metrics().registry.collect()}
    missing = registered - {family(name) for name in queried()}
    assert not missing, f"metrics with no panel: {sorted(missing)}"


def parse(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """One scrape: (family -> its type, sample name -> its values summed)."""
    types: dict[str, str] = {}
    sampled: dict[str, float] = {}
    for metric in text_string_to_metric_families(text):
        types[metric.name] = metric.type
        for sample in metric.samples:
            sampled[sample.name] = sampled.get(sample.name, 0.0) + sample.value
    return types, sampled


def worker_env(endpoint: str, redis_url: str, stream: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_HANDLERS=HANDLERS,
        SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
        SUPERSIM_IDLE_INTERVAL="0.2",
        SUPERSIM_LEASE_TTL="5",
        SUPERSIM_LOG_FORMAT="json",
        SUPERSIM_HTTP_PORT=str(port),
        SUPERSIM_ALERTS__SINKS="log,stream",
        SUPERSIM_ALERTS__STALE_AFTER="",  # the simulated episodes are old: send them anyway
    )
    return env


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``supersim-worker run``, its log lines (stderr) going to ``log``."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def metrics_page(session: aiohttp.ClientSession, port: int) -> str | None:
    try:
        async with session.get(
            f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            return await response.text() if response.status == 200 else None
    except aiohttp.ClientError:
        return None


async def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(
    kinesalite_endpoint: str, redis_url: str, tmp_path: Path
) -> None:
    """Scraped once a worker has read the whole simulated stream, /metrics has a sample of
    every series the dashboard queries, except the few listed in NO_SAMPLE_YET, which it
    declares with no sample."""
    names = queried()
    assert set(NO_SAMPLE_YET) <= names, "NO_SAMPLE_YET names a metric the dashboard drops"
    expected = names - set(NO_SAMPLE_YET)
    records, _ = generate(STREAM)
    stream = f"grafana-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=2)
    await put(kinesalite_endpoint, stream, [*records, MALFORMED])
    port = free_port()
    log = tmp_path / "worker.log"
    process = start(worker_env(kinesalite_endpoint, redis_url, stream, port), log)
    types: dict[str, str] = {}
    sampled: dict[str, float] = {}
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SCRAPE_WITHIN_S
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline and process.poll() is None:
                text = await metrics_page(session, port)
                if text is not None:
                    types, sampled = parse(text)
                    read = sampled.get("supersim_records_read_total", 0.0)
                    if read == len(records) + 1 and expected <= sampled.keys():
                        break
                await asyncio.sleep(0.3)
    finally:
        await asyncio.to_thread(stop, process)
    worker_log = log.read_text(errors="replace")[-3000:]
    read = sampled.get("supersim_records_read_total", 0.0)
    assert read == len(records) + 1, f"read {read} of {len(records) + 1}\n{worker_log}"
    missing = sorted(expected - sampled.keys())
    assert not missing, f"queried but not in the scrape: {missing}\n{worker_log}"
    for name in sorted(NO_SAMPLE_YET):
        assert types.get(family(name)) == "counter", f"{name} is not declared as a counter"
    undeclared = sorted(name for name in names if family(name) not in types)
    assert not undeclared, f"queried but no such family: {undeclared}"

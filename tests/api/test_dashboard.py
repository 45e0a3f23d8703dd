"""The Grafana dashboard in api/grafana works on the series /metrics serves: every metric a
query names has lines, and every label it filters, groups, joins or prints is on them.

The scrape comes from the demo fleet's simulated agents (every counter they fill) through the
API's cache, the same text /metrics serves, so a renamed series or label fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

import shardplane
from shardplane.agents.fleet import load as load_fleet
from shardplane.agents.sim import sim_nodes
from shardplane.api.state import ClusterCache
from shardplane.bus import codec
from shardplane.bus.messages import DeviceState
from tests.api.fleet import instance_state, node_state

DASHBOARD = Path(shardplane.__file__).resolve().parent / "api" / "grafana" / "shardplane.json"
DEMO_FLEET = Path(shardplane.__file__).resolve().parent / "fleets" / "demo.toml"

# PromQL words that are neither metrics nor functions.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"} | {
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
IDENT = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


class Query(msgspec.Struct, frozen=True):
    metrics: dict[str, frozenset[str]]  # metric -> label names its selector matches on
    grouping: frozenset[str]  # labels of by/without/on/ignoring/group_* clauses


def parse(expr: str) -> Query:
    """The metric names and label names a PromQL expression uses (enough of PromQL for a
    dashboard: selectors, aggregations, binary operators, ranges)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    grouping = {
        label.strip() for m in GROUPING.finditer(text) for label in m[2].split(",") if label.strip()
    }
    text = GROUPING.sub(" ", text)
    metrics: dict[str, frozenset[str]] = {}
    # A selector's labels belong to the metric just before it.
    pos = 0
    for m in SELECTOR.finditer(text):
        before = IDENT.findall(text[pos : m.start()])
        name = before[-1][0] if before and not before[-1][1] else None
        if name is None or name in KEYWORDS:
            raise AssertionError(f"{expr!r}: a selector without a metric name")
        metrics[name] = metrics.get(name, frozenset()) | frozenset(MATCHER.findall(m[1]))
        pos = m.end()
    for name, call in IDENT.findall(SELECTOR.sub(" ", text)):
        if not call and name not in KEYWORDS:
            metrics.setdefault(name, frozenset())
    return Query(metrics, frozenset(grouping))


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query, template variables included."""
    out: list[tuple[str, str, str]] = []
    panels: list[dict[str, Any]] = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels") or ())
        for target in panel.get("targets") or ():
            out.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"${var['name']}", f'{m[1]}{{{m[2]}=~".+"}}', ""))
    return out


@pytest.fixture(scope="module")
def scrape() -> dict[str, set[str]]:
    """Metric -> label names over its lines, from the demo fleet's simulated telemetry."""
    fleet = load_fleet(DEMO_FLEET)
    cache = ClusterCache()
    revision = 0
    for node in sim_nodes(fleet):
        revision += 1
        cache.apply(f"nodes.{node.node}", codec.encode(node_state(node.node)), revision)
        for tick in range(3):  # counters and rates need more than one reading
            for s in node.read(1000.0 + 2.0 * tick):
                revision += 1
                state = DeviceState(sample=s, online=True, last_seen=s.ts)
                cache.apply(f"devices.{s.node}.{s.index}", codec.encode(state), revision)
    revision += 1
    cache.apply("instances.llama-demo", codec.encode(instance_state()), revision)
    labels: dict[str, set[str]] = {}
    # The series name as Prometheus stores it is the one on the line: the parser would add
    # _total to a counter written without it (as dcgm-exporter writes its counters).
    for line in cache.metrics_body().decode().splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert name, line
            (family,) = text_string_to_metric_families(line + "\n")
            labels.setdefault(name[0], set()).update(family.samples[0].labels)
    return labels


def check(expr: str, legend: str, scrape: dict[str, set[str]]) -> None:
    query = parse(expr.replace("$hostname", ".*"))
    assert query.metrics, f"{expr!r}: no metric"
    seen: set[str] = set()
    for name, matched in query.metrics.items():
        assert name in scrape, f"{expr!r}: {name} has no line in /metrics"
        assert matched <= scrape[name], f"{expr!r}: {name} has no {set(matched - scrape[name])}"
        seen |= scrape[name]
    assert query.grouping <= seen, f"{expr!r}: no series has {set(query.grouping - seen)}"
    printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    assert printed <= seen, f"{expr!r}: the legend prints {printed - seen}, which no series has"


def test_every_dashboard_query_runs_on_our_series(scrape: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = targets(dashboard)
    assert len(queries) >= 30
    for title, expr, legend in queries:
        try:
            check(expr, legend, scrape)
        except AssertionError as exc:
            raise AssertionError(f"panel {title!r}: {exc}") from None
    # Both vendors' families are on the dashboard, and the fleet's own.
    used = {name for _, expr, _ in queries for name in parse(expr).metrics}
    assert {"DCGM_FI_DEV_GPU_UTIL", "gpu_gfx_activity", "shardplane_stage_state"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_check_catches_what_would_break_a_panel(scrape: dict[str, set[str]]) -> None:
    """The check can fail: a renamed metric, a label the series lack, a legend that prints
    nothing, and the AMD families under DCGM names."""
    check('DCGM_FI_DEV_GPU_UTIL{hostname=~"$hostname"}', "{{gpu}}", scrape)
    for expr, legend, why in (
        ("DCGM_FI_DEV_GPU_UTILIZATION", "", "has no line"),
        ('DCGM_FI_DEV_GPU_UTIL{Hostname="a"}', "", "has no {'Hostname'}"),
        ("sum by (instance) (shardplane_stage_state)", "", "no series has {'instance'}"),
        ("shardplane_stage_layers", "{{device}}", "prints {'device'}"),
        ("shardplane_stage_load_milliseconds", "", "has no line"),
        ('gpu_gfx_activity{UUID=~".+"}', "", "has no {'UUID'}"),
    ):
        with pytest.raises(AssertionError, match=re.escape(why)):
            check(expr, legend, scrape)


def test_promql_reading() -> None:
    q = parse(
        'sum by (hostname) (rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{hostname=~"a|b"}[5m])) '
        "/ 1000 * on (device_id) group_left (node) shardplane_device_up"
    )
    assert q.metrics == {
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": frozenset({"hostname"}),
        "shardplane_device_up": frozenset(),
    }
    assert q.grouping == {"hostname", "device_id", "node"}

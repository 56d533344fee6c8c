"""The provisioned dashboard: one fixed datasource uid everywhere, the panels the issue asks
for, ratios computed from counter rates, and the parser the query tests rely on."""

from __future__ import annotations

import re

import yaml

from tests.deploy import promql
from tests.deploy.conftest import REPO

UID = "specdec-prometheus"


def test_every_panel_and_target_uses_the_provisioned_datasource_uid() -> None:
    ds = yaml.safe_load((REPO / "deploy" / "grafana" / "provisioning" / "datasources"
                         / "prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == UID
    dashboard = promql.load_dashboard()
    panels = [p for p in promql.iter_panels(dashboard["panels"]) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": UID}, panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"] == {"type": "prometheus", "uid": UID}, var["name"]
    assert "${DS" not in (REPO / "deploy" / "grafana" / "dashboards" / "specdec.json").read_text()


def test_dashboard_identity_and_layout() -> None:
    dashboard = promql.load_dashboard()
    assert dashboard["uid"] == "specdec-overview"
    panels = list(promql.iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["refId"] and t["expr"].strip()
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


def test_the_issues_panels_are_there() -> None:
    exprs = {e.where: e.expr for e in promql.dashboard_expressions()}
    text = "\n".join(exprs.values())

    def panel(title_fragment: str) -> str:
        found = [x for w, x in exprs.items() if title_fragment.lower() in w.lower()]
        assert found, f"no panel titled like {title_fragment!r}"
        return "\n".join(found)

    rate_panel = panel("'Acceptance rate'")
    assert re.search(r"rate\(specdec_accepted_drafts_total.*\n/\n.*rate\(specdec_proposed_drafts_total",
                     rate_panel, re.S)
    length = panel("Acceptance length")
    assert "specdec_verify_passes_total" in length and "specdec_accepted_drafts_total" in length
    assert "by (position)" in panel("Per-position acceptance")
    assert "specdec_draft_passes_by_accepted_total" in panel("Accepted-count histogram")
    assert "specdec_request_accept_rate_bucket" in panel("Per-request acceptance rate (distribution")
    assert "specdec_completion_tokens_total" in panel("Tokens per second")
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in panel("Time to first token")
    assert "gen_ai_server_request_duration_seconds_bucket" in panel("Request duration")
    for name in ("specdec_sidecar_service_dropped_records_total",
                 "specdec_sidecar_records_rejected_total",
                 "specdec_sidecar_export_failures_total"):
        assert name in text
    # Never an average of per-request ratios, never a ratio gauge.
    assert not re.search(r"avg(_over_time)?\s*(by\s*\([^)]*\))?\s*\(\s*[a-z_]*accept_rate", text)
    assert "specdec_window_" not in text
    assert "specdec_request_accept_rate_sum" not in text


def test_promql_parser_finds_every_name() -> None:
    expr = ('sum by (gen_ai_request_model, le) (rate(foo_total{a="x",b=~"y|z"}[$__rate_interval]))\n'
            '/ on (le) group_left max without (instance) (bar_seconds_bucket offset 5m) '
            '> bool 1e3 and absent(baz) or histogram_quantile(0.9, qux_bucket[5m:1m]) '
            'unless rec:ord:rate5m')
    assert promql.metric_names(expr) == {"foo_total", "bar_seconds_bucket", "baz", "qux_bucket",
                                        "rec:ord:rate5m"}
    assert promql.metric_names("label_values(specdec_requests_total, specdec_method)") == \
        {"specdec_requests_total"}
    assert promql.grafana_substitute('rate(x{m=~"$model"}[$__rate_interval]) ${method}') == \
        'rate(x{m=~".*"}[30s]) .*'
    assert promql.comparisons_to_bool('a{b!="c"} < 0.3 and d > bool 1 or e == 2') == \
        'a{b!="c"} < bool 0.3 and d > bool 1 or e == bool 2'
    assert promql.expand_recording_rules("x:y < 1", {"x:y": "a / b"}) == "(a / b) < 1"

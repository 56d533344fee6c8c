"""The provisioned dashboard: one fixed datasource uid everywhere, the panels the issue asks
for, ratios computed from counter rates, and the parser the query tests rely on."""

from __future__ import annotations

import re

import yaml

from tests.deploy import promql
from tests.deploy.conftest import REPO

UID = "specdec-prometheus"


def test_every_panel_and_target_uses_the_provisioned_datasource_uid() -> None:
    ds = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
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
    assert re.search(
        r"rate\(specdec_accepted_drafts_total.*\n/\n.*rate\(specdec_proposed_drafts_total", rate_panel, re.S
    )
    length = panel("Acceptance length")
    assert "specdec_verify_passes_total" in length and "specdec_accepted_drafts_total" in length
    assert re.search(r"by \([^)]*\bposition\)", panel("Per-position acceptance"))
    assert "specdec_draft_passes_by_accepted_total" in panel("Accepted-count histogram")
    # Per-position views (issue 21): the conditional per-position acceptance, and the
    # acceptance-length distribution as shares of each (method, k)'s draft passes.
    conditional = panel("Per-position acceptance (conditional")
    assert re.search(
        r"specdec_position_accepted_total.*\n/\n.*specdec_position_proposed_total", conditional, re.S
    )
    shares = panel("Acceptance-length distribution by draft length k")
    assert re.search(
        r"by \(specdec_method, specdec_num_draft_tokens, accepted\) \(increase\("
        r"specdec_draft_passes_by_accepted_total.*\n/ on \(specdec_method, specdec_num_draft_tokens\) "
        r"group_left\nsum by \(specdec_method, specdec_num_draft_tokens\) \(increase\("
        r"specdec_draft_passes_by_accepted_total",
        shares,
        re.S,
    )
    assert "specdec_request_accept_length_bucket" in panel("Per-request acceptance length by draft length k")
    assert "specdec_request_accept_rate_bucket" in panel("Per-request acceptance rate (distribution")
    assert "specdec_completion_tokens_total" in panel("Tokens per second")
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in panel("Time to first token")
    assert "gen_ai_server_request_duration_seconds_bucket" in panel("Request duration")
    assert "gen_ai_server_time_per_output_token_seconds_bucket" in panel("Time per output token")
    for name in (
        "specdec_sidecar_service_dropped_records_total",
        "specdec_sidecar_records_rejected_total",
        "specdec_sidecar_export_failures_total",
    ):
        assert name in text
    # Never an average of per-request ratios, never a ratio gauge.
    assert not re.search(r"avg(_over_time)?\s*(by\s*\([^)]*\))?\s*\(\s*[a-z_]*accept_rate", text)
    assert "specdec_window_" not in text
    assert "specdec_request_accept_rate_sum" not in text


def test_promql_parser_finds_every_name() -> None:
    expr = (
        'sum by (gen_ai_request_model, le) (rate(foo_total{a="x",b=~"y|z"}[$__rate_interval]))\n'
        "/ on (le) group_left max without (instance) (bar_seconds_bucket offset 5m) "
        "> bool 1e3 and absent(baz) or histogram_quantile(0.9, qux_bucket[5m:1m]) "
        "unless rec:ord:rate5m"
    )
    assert promql.metric_names(expr) == {
        "foo_total",
        "bar_seconds_bucket",
        "baz",
        "qux_bucket",
        "rec:ord:rate5m",
    }
    assert promql.metric_names("label_values(specdec_requests_total, specdec_method)") == {
        "specdec_requests_total"
    }
    assert (
        promql.grafana_substitute('rate(x{m=~"$model"}[$__rate_interval]) ${method}')
        == 'rate(x{m=~".*"}[30s]) .*'
    )
    assert (
        promql.comparisons_to_bool('a{b!="c"} < 0.3 and d > bool 1 or e == 2')
        == 'a{b!="c"} < bool 0.3 and d > bool 1 or e == bool 2'
    )
    assert promql.expand_recording_rules("x:y < 1", {"x:y": "a / b"}) == "(a / b) < 1"


# Series whose ratios (or distributions of ratios) depend on the drafter and the draft length.
ACCEPTANCE_SERIES = re.compile(
    r"specdec_(accepted_drafts|proposed_drafts|verify_passes|draft_passes"
    r"|position_accepted|position_proposed|draft_passes_by_accepted"
    r"|request_accept_rate_bucket|request_accept_length_bucket)"
)
# The one panel that shows a pooled distribution over requests, and says so in its description.
POOLED = "Per-request acceptance rate (distribution of requests)"


def test_acceptance_ratios_are_kept_apart_per_method_and_draft_length() -> None:
    """The acceptance rate falls as k grows even for an equally good drafter, and n-gram and
    draft-model acceptance are different quantities: every aggregation of the acceptance
    series in the dashboard and the recording rules keeps specdec_method and
    specdec_num_draft_tokens, never sums over them."""
    dashboard = promql.load_dashboard()
    pooled = [p for p in promql.iter_panels(dashboard["panels"]) if p.get("title") == POOLED]
    assert pooled and "pick one method and one k" in pooled[0]["description"]
    exprs = [
        e
        for e in promql.dashboard_expressions() + promql.rule_expressions()
        if e.kind in ("panel", "record") and ACCEPTANCE_SERIES.search(e.expr) and POOLED not in e.where
    ]
    assert len(exprs) >= 10, [e.where for e in exprs]
    failures = []
    for e in exprs:
        aggregations = re.findall(r"\bsum\s*(by\s*\(([^)]*)\))?\s*\(", e.expr)
        assert aggregations, e.where
        for by, labels in aggregations:
            kept = {label.strip() for label in labels.split(",")}
            if not by or not {"specdec_method", "specdec_num_draft_tokens"} <= kept:
                failures.append(f"{e.where}: sum {by or '(over everything)'}")
    assert not failures, "\n".join(failures)


def test_every_acceptance_panel_follows_the_draft_length_variable() -> None:
    names = [v["name"] for v in promql.load_dashboard()["templating"]["list"]]
    assert "k" in names
    for e in promql.dashboard_expressions():
        if ACCEPTANCE_SERIES.search(e.expr):
            assert 'specdec_num_draft_tokens=~"$k"' in e.expr, e.where

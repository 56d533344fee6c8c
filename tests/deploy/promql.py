"""What the deploy tests need to know about the PromQL in deploy/: where the expressions are,
which metric names they use, and how to make each one runnable against a test Prometheus.

- `dashboard_expressions()` / `rule_expressions()`: every expression with where it came from.
- `metric_names(expr)`: the metric (or recording-rule) names an expression selects.
- `grafana_substitute(expr)`: Grafana's variables ($__rate_interval, $__range, ...) and the
  dashboard's template variables replaced by values a just-started Prometheus can answer.
- `expand_recording_rules(expr, rules)`: recording-rule names replaced by their expressions,
  so an alert can be evaluated without waiting for rule evaluation.
- `comparisons_to_bool(expr)`: `a < 0.3 and b > 1` -> `a < bool 0.3 and b > bool 1`: the alert's
  label matching is exercised (both sides must have data with matching labels) whether or not
  the alert condition holds right now.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "specdec.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# Values for Grafana's built-in variables in the tests: short enough for a Prometheus that
# has scraped for well under a minute, long enough to cover two or more 1 s scrapes.
GRAFANA_TEST_VALUES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "2m",
    "__range_s": "120",
    "__range_ms": "120000",
    "__interval_ms": "5000",
}

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
    # aggregation operators (may be followed by `by (...)` before their parenthesis)
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
}
AGGREGATION_OR_FUNCTION = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\s*\(")


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "dashboard panel 'Acceptance rate' target A", "rule alert:Foo"
    expr: str
    kind: str  # "panel", "variable", "record", "alert"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_expressions(dashboard: dict | None = None) -> list[Expression]:
    dashboard = dashboard or load_dashboard()
    out = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            out.append(
                Expression(
                    f"dashboard panel {panel.get('title')!r} target {target.get('refId')}",
                    target["expr"],
                    "panel",
                )
            )
    return out


def dashboard_variable_queries(dashboard: dict | None = None) -> list[Expression]:
    dashboard = dashboard or load_dashboard()
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var.get("query"), dict) else var["query"]
        out.append(Expression(f"dashboard variable ${var['name']}", query, "variable"))
    return out


def rule_expressions(rules: dict | None = None) -> list[Expression]:
    rules = rules or load_rules()
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.append(Expression(f"rule record:{rule['record']}", rule["expr"], "record"))
            else:
                out.append(Expression(f"rule alert:{rule['alert']}", rule["expr"], "alert"))
    return out


def recording_rules(rules: dict | None = None) -> dict[str, str]:
    rules = rules or load_rules()
    return {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}


# ---- parsing --------------------------------------------------------------------------------


def _blank(match: re.Match) -> str:
    return " " * len(match.group(0))


def strip_non_selectors(expr: str) -> str:
    """The expression with strings, label matchers, range/subquery brackets, grouping label
    lists and comments blanked out: what is left are names, functions, numbers, operators."""
    s = re.sub(r"#[^\n]*", _blank, expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', _blank, s)
    s = re.sub(r"\{[^{}]*\}", _blank, s)
    s = re.sub(r"\[[^\[\]]*\]", _blank, s)
    s = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)",
        lambda m: m.group(1) + " " * (len(m.group(0)) - len(m.group(1))),
        s,
    )
    assert len(s) == len(expr)
    return s


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording-rule names) selected by a PromQL expression. Grafana's
    label_values(metric, label) selects `metric`."""
    m = re.fullmatch(r"\s*label_values\(\s*([^,()]+?)\s*(?:,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*)?\)\s*", expr)
    if m:
        return metric_names(m.group(1))
    s = strip_non_selectors(expr)
    names = set()
    for token in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        name = token.group(0)
        if name.lower() in KEYWORDS:
            continue
        if AGGREGATION_OR_FUNCTION.match(s, token.start()):
            continue  # a function or aggregation: name(
        before = s[: token.start()]
        if re.search(r"[0-9.]$", before):  # part of a number like 1e3 or a duration
            continue
        names.add(name)
    return names


def grafana_substitute(expr: str, template_values: dict[str, str] | None = None) -> str:
    """Replace $__rate_interval & co. by test values, and template variables by `.*` (or the
    given values), in both the $var and ${var} spellings."""
    values = {**GRAFANA_TEST_VALUES, **(template_values or {})}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        name = name.split(":")[0]  # ${var:regex} and similar formats
        return values.get(name, ".*")

    return re.sub(r"\$\{([a-zA-Z_][a-zA-Z0-9_:]*)\}|\$([a-zA-Z_][a-zA-Z0-9_]*)", repl, expr)


def expand_recording_rules(expr: str, rules: dict[str, str], depth: int = 0) -> str:
    assert depth < 10, "recording rules refer to each other in a cycle"
    names = sorted(metric_names(expr) & rules.keys(), key=len, reverse=True)
    for name in names:
        expr = re.sub(
            rf"(?<![a-zA-Z0-9_:]){re.escape(name)}(?![a-zA-Z0-9_:])",
            lambda _: f"({rules[name].strip()})",  # noqa: B023
            expr,
        )
    if metric_names(expr) & rules.keys():
        return expand_recording_rules(expr, rules, depth + 1)
    return expr


def comparisons_to_bool(expr: str) -> str:
    """Add the `bool` modifier to every comparison operator outside label matchers and
    strings (where =, != also occur)."""
    masked = strip_non_selectors(expr)
    out, last = [], 0
    for m in re.finditer(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)", masked):
        out.append(expr[last : m.end()])
        out.append(" bool")
        last = m.end()
    out.append(expr[last:])
    return "".join(out)

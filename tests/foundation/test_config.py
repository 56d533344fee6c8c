"""Every setting is a flag that overrides an environment variable; the README lists them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import OPTIONS, ServiceConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_work_without_environment() -> None:
    config = ServiceConfig.from_args([], environ={})
    assert config.listen == "127.0.0.1:50051"
    assert config.telemetry_target == "127.0.0.1:50052"
    assert config.instance_id  # generated


def test_tracing_is_off_by_default_and_set_by_flag_or_variable() -> None:
    assert ServiceConfig.from_args([], environ={}).tracing is False
    assert ServiceConfig.from_args([], environ={"SPECDEC_TRACING": "true"}).tracing is True
    assert (
        ServiceConfig.from_args(["--tracing", "false"], environ={"SPECDEC_TRACING": "true"}).tracing is False
    )


def test_environment_sets_and_flag_overrides() -> None:
    env = {"SPECDEC_MAX_BATCH_SIZE": "3", "SPECDEC_METHOD": "none", "SPECDEC_INSTANCE_ID": "a"}
    assert ServiceConfig.from_args([], environ=env).max_batch_size == 3
    config = ServiceConfig.from_args(["--max-batch-size", "5"], environ=env)
    assert (config.max_batch_size, config.method, config.instance_id) == (5, "none", "a")


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {"SPECDEC_MAX_BATCH_SIZE": "zero"}, "SPECDEC_MAX_BATCH_SIZE"),
        (["--method", "medusa"], {}, "none, ngram, draft_model"),
        (["--num-draft-tokens", "9"], {}, "--num-draft-tokens"),
        (["--gemv-max-rows", "4"], {}, "--gemv-max-rows must be 0 or at least --max-num-draft-tokens + 1"),
        ([], {"SPECDEC_GEMV_MAX_ROWS": "many"}, "SPECDEC_GEMV_MAX_ROWS"),
        (
            ["--prefill-graph-tokens", "8"],
            {},
            "--prefill-graph-tokens must be 0 (no prefill graphs) or at least 16",
        ),
        ([], {"SPECDEC_PREFILL_GRAPH_TOKENS": "-1"}, "SPECDEC_PREFILL_GRAPH_TOKENS"),
        (["--method", "draft_model"], {}, "--draft-model"),
        (["--tracing", "maybe"], {}, "must be true or false"),
        (["--tracing", "true", "--telemetry-target", ""], {}, "--tracing needs --telemetry-target"),
    ],
)
def test_bad_settings_are_named(argv, env, message, capsys) -> None:
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(argv, environ=env)
    assert message in capsys.readouterr().err


def test_readme_documents_every_option() -> None:
    text = README.read_text()
    for option in OPTIONS:
        row = re.search(rf"^\|\s*`{re.escape(option.flag)}`\s*\|\s*`{option.env}`\s*\|.*$", text, re.M)
        assert row, f"README configuration table lacks {option.flag} / {option.env}"

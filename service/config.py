"""Service configuration: every command-line flag overrides an environment variable.

One table (OPTIONS) defines each setting's flag, variable, type, default and help; the
README's configuration table lists the same rows (a test keeps them in step).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields

from service.engine.config import MIN_PREFILL_GRAPH_TOKENS
from specdec_common.proto_names import METHOD_BY_NAME
from specdec_common.settings import (
    Option,
    add_options,
    choice,
    non_negative_float,
    non_negative_int,
    parse_bool,
    positive_int,
)
from specdec_security import ClientSecurity, ServerSecurity

# Prompt limits checked before tokenization (service.api.request_mapping.check_prompt_size).
DEFAULT_MAX_PROMPT_CHARS = 128 * 1024
DEFAULT_MAX_PROMPT_BYTES = 256 * 1024


_method = choice(*METHOD_BY_NAME)


def gemv_rows_setting(value: str) -> int | str:
    """--gemv-max-rows: "auto" or a row count >= 0 (the benchmark tools parse it with this too)."""
    if value == "auto":
        return value
    try:
        return non_negative_int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer >= 0, not {value!r}") from None


ENGINE_PROCESS_MODES = ("process", "thread")
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:\[\]/]*):[0-9]{1,5}")  # [v6]:port or host:port


OPTIONS: tuple[Option, ...] = (
    Option("listen", "SPECDEC_LISTEN", str, "127.0.0.1:50051", "gRPC listen address (host:port)"),
    Option(
        "model",
        "SPECDEC_MODEL",
        str,
        "smollm2-135m-instruct",
        "target model: known name, GGUF file, local directory or hub id",
    ),
    Option(
        "draft_model",
        "SPECDEC_DRAFT_MODEL",
        str,
        "",
        "draft model (same vocabulary as the target); empty: none",
    ),
    Option("method", "SPECDEC_METHOD", _method, "ngram", "default drafter: none, ngram or draft_model"),
    Option("num_draft_tokens", "SPECDEC_NUM_DRAFT_TOKENS", int, 4, "default k, draft tokens per pass"),
    Option(
        "max_num_draft_tokens",
        "SPECDEC_MAX_NUM_DRAFT_TOKENS",
        positive_int,
        8,
        "largest k a request may ask for",
    ),
    Option(
        "adaptive_draft_length",
        "SPECDEC_ADAPTIVE_DRAFT_LENGTH",
        parse_bool,
        True,
        "shorten drafts pass by pass from measured acceptance and pass cost (greedy and unseeded requests)",
    ),
    Option(
        "max_batch_size", "SPECDEC_MAX_BATCH_SIZE", positive_int, 8, "requests decoded together in one pass"
    ),
    Option(
        "max_queue_size",
        "SPECDEC_MAX_QUEUE_SIZE",
        positive_int,
        64,
        "requests waiting for a batch slot before RESOURCE_EXHAUSTED",
    ),
    Option(
        "max_prefill_tokens_per_pass",
        "SPECDEC_MAX_PREFILL_TOKENS_PER_PASS",
        positive_int,
        2048,
        "prompt tokens prefilled at most between two decode passes (long prompts in chunks)",
    ),
    Option(
        "prefill_graph_tokens",
        "SPECDEC_PREFILL_GRAPH_TOKENS",
        non_negative_int,
        512,
        "CUDA: a prefill of one request from position 0 of up to this many tokens replays a "
        "captured graph (docs/prefill.md); rounded down to a bucket, at most 512; 0: every "
        "prefill eager, else at least 16",
    ),
    Option(
        "default_max_tokens",
        "SPECDEC_DEFAULT_MAX_TOKENS",
        positive_int,
        256,
        "max_tokens when a request sets none",
    ),
    Option(
        "max_tokens_limit",
        "SPECDEC_MAX_TOKENS_LIMIT",
        positive_int,
        4096,
        "largest max_tokens a request may ask for",
    ),
    Option(
        "max_request_bytes",
        "SPECDEC_MAX_REQUEST_BYTES",
        positive_int,
        1 << 20,
        "largest serialized GenerateRequest accepted (INVALID_ARGUMENT above)",
    ),
    Option(
        "max_prompt_chars",
        "SPECDEC_MAX_PROMPT_CHARS",
        positive_int,
        DEFAULT_MAX_PROMPT_CHARS,
        "largest prompt in characters (text, or all messages), checked before tokenization",
    ),
    Option(
        "max_prompt_bytes",
        "SPECDEC_MAX_PROMPT_BYTES",
        positive_int,
        DEFAULT_MAX_PROMPT_BYTES,
        "largest prompt in UTF-8 bytes (text, or all messages), checked before tokenization",
    ),
    Option(
        "dtype",
        "SPECDEC_DTYPE",
        str,
        "auto",
        "model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
    ),
    Option("device", "SPECDEC_DEVICE", str, "auto", "device: auto (CUDA when present), cpu, cuda:N"),
    Option("cache_dir", "SPECDEC_CACHE_DIR", str, "", "model cache directory (default ~/.cache/specdec)"),
    Option(
        "linear_blocks",
        "SPECDEC_LINEAR_BLOCKS",
        str,
        "",
        "JSON file of the invariant kernels' block shapes per weight shape, over the committed "
        "table (docs/engine.md); empty: the committed table",
    ),
    Option(
        "gemv_max_rows",
        "SPECDEC_GEMV_MAX_ROWS",
        gemv_rows_setting,
        "auto",
        "CUDA: passes of up to this many token rows on the gemv kernel, larger ones on the tile "
        "kernel (docs/engine.md); 0: the tile kernel for every pass; else at least "
        "--max-num-draft-tokens + 1; auto: 0 for models of hidden size 4096 and up, below "
        "max(16, --max-num-draft-tokens + 1)",
    ),
    Option(
        "telemetry_target",
        "SPECDEC_TELEMETRY_TARGET",
        str,
        "127.0.0.1:50052",
        "sidecar ingest address; empty disables reporting",
    ),
    Option(
        "telemetry_tls_ca_file",
        "SPECDEC_TELEMETRY_TLS_CA_FILE",
        str,
        "",
        "PEM CA bundle that signed the sidecar's certificate; set: TLS to the sidecar",
    ),
    Option(
        "telemetry_tls_cert_file",
        "SPECDEC_TELEMETRY_TLS_CERT_FILE",
        str,
        "",
        "PEM client certificate sent to the sidecar (mutual TLS); needs the key file",
    ),
    Option(
        "telemetry_tls_key_file",
        "SPECDEC_TELEMETRY_TLS_KEY_FILE",
        str,
        "",
        "private key of --telemetry-tls-cert-file",
    ),
    Option(
        "telemetry_auth_token_file",
        "SPECDEC_TELEMETRY_AUTH_TOKEN_FILE",
        str,
        "",
        "file holding the bearer token sent to the sidecar (re-read on every reconnect)",
    ),
    Option(
        "telemetry_buffer_size",
        "SPECDEC_TELEMETRY_BUFFER_SIZE",
        positive_int,
        10000,
        "metrics messages buffered for the sidecar before the oldest are dropped",
    ),
    Option(
        "tracing",
        "SPECDEC_TRACING",
        parse_bool,
        False,
        "trace requests: capture the incoming W3C traceparent (or start a trace) and send it "
        "with the request's metrics; the sidecar emits the span (docs/tracing.md)",
    ),
    Option(
        "instance_id",
        "SPECDEC_INSTANCE_ID",
        str,
        "",
        "service.instance.id of this replica (default: hostname plus a random suffix)",
    ),
    Option(
        "grace_period_s",
        "SPECDEC_GRACE_PERIOD_S",
        non_negative_float,
        30.0,
        "seconds running requests may take to finish on SIGTERM (queued ones get UNAVAILABLE at once)",
    ),
    Option(
        "tls_cert_file",
        "SPECDEC_TLS_CERT_FILE",
        str,
        "",
        "PEM certificate chain of this server; with --tls-key-file: TLS (empty: plaintext)",
    ),
    Option("tls_key_file", "SPECDEC_TLS_KEY_FILE", str, "", "private key of --tls-cert-file"),
    Option(
        "tls_client_ca_file",
        "SPECDEC_TLS_CLIENT_CA_FILE",
        str,
        "",
        "PEM CA bundle; set: mutual TLS, clients must present a certificate it signed",
    ),
    Option(
        "auth_tokens_file",
        "SPECDEC_AUTH_TOKENS_FILE",
        str,
        "",
        "file of accepted bearer tokens, one per line, reloaded on SIGHUP; set: every RPC "
        "but health needs one (empty: no token check)",
    ),
    Option(
        "engine_process",
        "SPECDEC_ENGINE_PROCESS",
        choice(*ENGINE_PROCESS_MODES),
        "process",
        "where the engine runs: process (a child process owns the models and the device; this "
        "one owns gRPC, tokenization and reporting) or thread (in this process, sharing its GIL)",
    ),
    Option(
        "front_ends",
        "SPECDEC_FRONT_ENDS",
        positive_int,
        1,
        "gRPC front-end processes on the listen port (SO_REUSEPORT: the kernel spreads client "
        "connections between them), each with its own pipe to the engine process; more than 1 "
        "needs --engine-process process and a host:port address",
    ),
    Option("log_level", "SPECDEC_LOG_LEVEL", str, "INFO", "log level"),
)


@dataclass(frozen=True)
class ServiceConfig:
    listen: str
    model: str
    draft_model: str
    method: str
    num_draft_tokens: int
    max_num_draft_tokens: int
    adaptive_draft_length: bool
    max_batch_size: int
    max_queue_size: int
    max_prefill_tokens_per_pass: int
    prefill_graph_tokens: int
    default_max_tokens: int
    max_tokens_limit: int
    max_request_bytes: int
    max_prompt_chars: int
    max_prompt_bytes: int
    dtype: str
    device: str
    cache_dir: str
    linear_blocks: str
    gemv_max_rows: int | str  # "auto" or a row count
    telemetry_target: str
    telemetry_tls_ca_file: str
    telemetry_tls_cert_file: str
    telemetry_tls_key_file: str
    telemetry_auth_token_file: str
    telemetry_buffer_size: int
    tracing: bool
    instance_id: str
    grace_period_s: float
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    auth_tokens_file: str
    engine_process: str
    front_ends: int
    log_level: str

    @property
    def server_security(self) -> ServerSecurity:
        return ServerSecurity(
            self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_tokens_file
        )

    @property
    def telemetry_security(self) -> ClientSecurity:
        return ClientSecurity(
            self.telemetry_tls_ca_file,
            self.telemetry_tls_cert_file,
            self.telemetry_tls_key_file,
            self.telemetry_auth_token_file,
            flag_prefix="--telemetry-",
            env_prefix="SPECDEC_TELEMETRY_",
        )

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
    ) -> ServiceConfig:
        environ = os.environ if environ is None else environ
        parser = build_parser(environ)
        values = vars(parser.parse_args(argv))
        if not values["instance_id"]:
            values["instance_id"] = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        if not 0 <= values["num_draft_tokens"] <= values["max_num_draft_tokens"]:
            parser.error(f"--num-draft-tokens must be in [0, {values['max_num_draft_tokens']}]")
        rows = values["gemv_max_rows"]
        if rows != "auto" and rows and rows <= values["max_num_draft_tokens"]:
            parser.error(
                f"--gemv-max-rows must be 0 or at least --max-num-draft-tokens + 1 = "
                f"{values['max_num_draft_tokens'] + 1} (a batch-1 verify pass on the decode pass's kernel)"
            )
        if 0 < values["prefill_graph_tokens"] < MIN_PREFILL_GRAPH_TOKENS:
            parser.error(
                f"--prefill-graph-tokens must be 0 (no prefill graphs) or at least "
                f"{MIN_PREFILL_GRAPH_TOKENS} (the smallest bucket)"
            )
        if values["method"] == "draft_model" and not values["draft_model"]:
            parser.error("--method draft_model needs --draft-model")
        if values["front_ends"] > 1:
            if values["engine_process"] != "process":
                parser.error("--front-ends above 1 needs --engine-process process (one engine for all)")
            if not HOST_PORT.fullmatch(values["listen"]):
                parser.error(
                    f"--front-ends above 1 needs a host:port --listen address (SO_REUSEPORT), "
                    f"not {values['listen']!r}"
                )
        if values["tracing"] and not values["telemetry_target"]:
            parser.error("--tracing needs --telemetry-target: the sidecar emits the spans")
        config = cls(**values)
        for problem in (config.server_security.problem(), config.telemetry_security.problem()):
            if problem:
                parser.error(problem)
        return config


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-server",
        description="Speculative-decoding inference service (gRPC). "
        "Every flag's default comes from the environment variable named in its help.",
    )
    names = {f.name for f in fields(ServiceConfig)}
    assert all(option.name in names for option in OPTIONS), "an option without a config field"
    add_options(parser, OPTIONS, environ)
    return parser

"""docs/security.md and the secure set-up of docs/operations.md name only settings that exist,
and security.md covers every security setting of the servers, the reporter and the client."""

from __future__ import annotations

import re

from service.client.options import CLIENT_ENV_PREFIX
from service.config import OPTIONS
from telemetry.config import OPTIONS as SIDECAR_OPTIONS
from tests.security.conftest import REPO

SECURITY = (REPO / "docs" / "security.md").read_text()
OPERATIONS = (REPO / "docs" / "operations.md").read_text()
CLIENT_FIELDS = ("tls_ca_file", "tls_cert_file", "tls_key_file", "auth_token_file")


def known_variables() -> set[str]:
    sidecar = {option.env for option in SIDECAR_OPTIONS}
    client = {CLIENT_ENV_PREFIX + field.upper() for field in CLIENT_FIELDS}
    compose = {
        name
        for path in [REPO / "docker-compose.yml", *(REPO / "deploy").glob("compose.*.yml")]
        for name in re.findall(r"\$\{(SPECDEC_[A-Z_]+)", path.read_text())
    }
    return {option.env for option in OPTIONS} | sidecar | client | compose


def named_variables(text: str) -> set[str]:
    """SPECDEC_* names, with `SPECDEC_X_{A,B}_FILE` expanded."""
    names = set()
    for prefix, choices, suffix in re.findall(r"(SPECDEC_[A-Z_]*)(?:\{([A-Z_,]+)\}([A-Z_]*))?", text):
        for choice in choices.split(",") if choices else [""]:
            names.add(prefix + choice + suffix)
    return {name for name in names if not name.endswith("_")}


def secure_set_up() -> str:
    return OPERATIONS.split("## Secure set-up", 1)[1].split("\n## ", 1)[0]


def test_the_security_docs_name_only_real_settings() -> None:
    known = known_variables()
    for name, text in (("docs/security.md", SECURITY), ("operations.md secure set-up", secure_set_up())):
        unknown = named_variables(text) - known
        assert not unknown, f"{name} names settings that do not exist: {sorted(unknown)}"


def test_security_md_covers_every_security_setting() -> None:
    security_fields = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file")
    flags = {"--" + f.replace("_", "-") for f in security_fields}
    flags |= {"--telemetry-" + f.replace("_", "-") for f in CLIENT_FIELDS}
    flags |= {"--" + f.replace("_", "-") for f in CLIENT_FIELDS}
    missing = sorted(flag for flag in flags if f"`{flag}`" not in SECURITY)
    assert not missing, f"docs/security.md does not describe {missing}"
    for heading in ("## Who can reach which port", "## What each setting protects", "## Out of scope"):
        assert heading in SECURITY

"""Bearer tokens kept in a file: one per line, several at once so that tokens can rotate.

File format: one token per line; blank lines and lines starting with '#' are skipped;
surrounding whitespace is stripped. A token is printable ASCII without spaces (it travels in
an HTTP/2 header) and at least MIN_TOKEN_CHARS long. Servers keep only SHA-256 digests of
the tokens and compare digests in constant time; no error message or log line carries a
token.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# 16 characters of `openssl rand -hex 32` output already carry 64 bits; shorter secrets are
# guessable by anyone who can reach the port often enough.
MIN_TOKEN_CHARS = 16


class SecuritySetupError(ValueError):
    """A security setting that cannot be used; the message names the setting."""


def _is_header_safe(token: str) -> bool:
    return all("!" <= ch <= "~" for ch in token)


def read_tokens(path: str, setting: str) -> tuple[str, ...]:
    """The tokens in `path`, in file order; raises SecuritySetupError naming `setting`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecuritySetupError(f"{setting}: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecuritySetupError(f"{setting}: {path!r} is not UTF-8 text") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _is_header_safe(token):
            raise SecuritySetupError(
                f"{setting}: line {number} of {path!r} is not a token: printable ASCII "
                "without spaces, one token per line"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise SecuritySetupError(
                f"{setting}: the token on line {number} of {path!r} is shorter than "
                f"{MIN_TOKEN_CHARS} characters (make one with `openssl rand -hex 32`)"
            )
        tokens.append(token)
    if not tokens:
        raise SecuritySetupError(f"{setting}: {path!r} holds no token")
    return tuple(tokens)


def read_single_token(path: str, setting: str) -> str:
    """A client's token file: exactly one token (same format as a server's file)."""
    tokens = read_tokens(path, setting)
    if len(tokens) != 1:
        raise SecuritySetupError(
            f"{setting}: {path!r} holds {len(tokens)} tokens; a client sends exactly one"
        )
    return tokens[0]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenSet:
    """The tokens a server accepts. `accepts` compares the candidate's digest with every
    accepted digest (no early exit, hmac.compare_digest), so its time does not depend on
    which token, or how much of one, matched. `reload` re-reads the file (SIGHUP); a file
    that no longer reads as tokens is logged and the previous tokens stay in force."""

    def __init__(self, path: str, setting: str) -> None:
        self.path = path
        self.setting = setting
        self._digests: tuple[bytes, ...] = tuple(_digest(t) for t in read_tokens(path, setting))

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        candidate = _digest(token)
        accepted = False
        for digest in self._digests:  # one tuple read: a concurrent reload swaps it whole
            accepted |= hmac.compare_digest(digest, candidate)
        return accepted

    def reload(self) -> bool:
        try:
            digests = tuple(_digest(t) for t in read_tokens(self.path, self.setting))
        except SecuritySetupError as exc:
            log.error("auth_tokens_reload_failed", error=str(exc), tokens_kept=len(self._digests))
            return False
        self._digests = digests
        log.info("auth_tokens_reloaded", file=self.path, tokens=len(digests))
        return True

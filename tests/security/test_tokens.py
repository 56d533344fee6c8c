"""Token files and the Bearer header, without a server."""

from __future__ import annotations

import pytest

from specdec_security.interceptor import MALFORMED, MISSING, bearer_token
from specdec_security.tokens import (
    MIN_TOKEN_CHARS,
    SecuritySetupError,
    TokenSet,
    read_single_token,
    read_tokens,
)
from tests.security.conftest import TOKEN_A, TOKEN_B


def test_tokens_one_per_line_with_comments_and_blanks(token_file) -> None:
    path = token_file("# rotation: B replaces A", "", f"  {TOKEN_A}  ", TOKEN_B)
    assert read_tokens(path, "--auth-tokens-file") == (TOKEN_A, TOKEN_B)
    tokens = TokenSet(path, "--auth-tokens-file")
    assert len(tokens) == 2
    assert tokens.accepts(TOKEN_A) and tokens.accepts(TOKEN_B)
    assert not tokens.accepts(TOKEN_A[:-1]) and not tokens.accepts(TOKEN_A + "x")
    assert not tokens.accepts("") and not tokens.accepts("# rotation: B replaces A")


@pytest.mark.parametrize(
    "lines, message",
    [
        ((), "holds no token"),
        (("# only a comment",), "holds no token"),
        (("s3cr3t",), f"shorter than {MIN_TOKEN_CHARS} characters"),
        (("with a space inside it, long enough",), "printable ASCII without spaces"),
        (("caf\u00e9" * 8,), "printable ASCII without spaces"),
    ],
)
def test_bad_token_files_are_named_and_never_echo_the_token(token_file, lines, message) -> None:
    path = token_file(*lines)
    with pytest.raises(SecuritySetupError) as info:
        read_tokens(path, "--auth-tokens-file (SPECDEC_AUTH_TOKENS_FILE)")
    text = str(info.value)
    assert message in text and "--auth-tokens-file (SPECDEC_AUTH_TOKENS_FILE)" in text
    for line in lines:
        if not line.startswith("#"):
            assert line not in text


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(SecuritySetupError, match="--auth-tokens-file: cannot read"):
        read_tokens(str(tmp_path / "absent"), "--auth-tokens-file")


def test_a_client_sends_exactly_one_token(token_file) -> None:
    assert read_single_token(token_file(TOKEN_A), "--auth-token-file") == TOKEN_A
    with pytest.raises(SecuritySetupError, match="holds 2 tokens"):
        read_single_token(token_file(TOKEN_A, TOKEN_B), "--auth-token-file")


def test_reload_swaps_tokens_and_keeps_them_when_the_new_file_is_bad(token_file, tmp_path) -> None:
    path = token_file(TOKEN_A)
    tokens = TokenSet(path, "--auth-tokens-file")
    with open(path, "w") as f:
        f.write(TOKEN_B + "\n")
    assert tokens.reload()
    assert tokens.accepts(TOKEN_B) and not tokens.accepts(TOKEN_A)
    with open(path, "w") as f:
        f.write("")  # an emptied file would lock everyone out: refused, B stays
    assert not tokens.reload()
    assert tokens.accepts(TOKEN_B)


@pytest.mark.parametrize(
    "metadata, token, reason",
    [
        ((), None, MISSING),
        ((("x-other", "1"),), None, MISSING),
        ((("authorization", f"Bearer {TOKEN_A}"),), TOKEN_A, None),
        ((("authorization", f"bearer   {TOKEN_A} "),), TOKEN_A, None),
        ((("authorization", TOKEN_A),), None, MALFORMED),
        ((("authorization", "Bearer "),), None, MALFORMED),
        ((("authorization", "Basic dXNlcjpwYXNz"),), None, MALFORMED),
        ((("authorization", f"Bearer {TOKEN_A}"), ("authorization", f"Bearer {TOKEN_B}")), None, MALFORMED),
    ],
)
def test_bearer_header_parsing(metadata, token, reason) -> None:
    assert bearer_token(metadata) == (token, reason)

"""Token lists, secret hygiene in reprs and Redis URL redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.security_config import (
    AUTH_TOKENS_ENV,
    INTERNAL_TOKEN_ENV,
    SecurityConfig,
    load_auth_tokens,
    parse_token_lines,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://alice:s3cret@cache.example:6380/2", "rediss://alice:***@cache.example:6380/2"),
        ("redis://s3cret@host:1/0", "redis://***@host:1/0"),
        ("redis://host:1/0?password=s3cret&db=3", "redis://host:1/0?password=***&db=3"),
        ("unix:///tmp/redis.sock?password=s3cret", "unix:///tmp/redis.sock?password=***"),
    ],
)
def test_redact_url_hides_passwords(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_token_lines_skip_blanks_and_comments() -> None:
    assert parse_token_lines("a\n\n  # comment\n b \nc\n") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="whitespace"):
        parse_token_lines("two words\n")


def test_load_auth_tokens_merges_flags_file_and_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# team tokens\nfile-1\nfile-2\n")
    env = {AUTH_TOKENS_ENV: "env-1\nflag-1\n"}
    assert load_auth_tokens(["flag-1"], token_file, env) == ("flag-1", "file-1", "file-2", "env-1")
    assert load_auth_tokens(None, None, {}) == ()
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no token"):
        load_auth_tokens(None, tmp_path / "empty", {})


def test_repr_hides_secrets_and_secret_env_carries_them() -> None:
    security = SecurityConfig(auth_tokens=("pub-1", "pub-2"), internal_token="internal-xyz")
    assert "pub-1" not in repr(security) and "internal-xyz" not in repr(security)
    assert security.secret_env() == {INTERNAL_TOKEN_ENV: "internal-xyz", AUTH_TOKENS_ENV: "pub-1\npub-2"}
    assert SecurityConfig().secret_env() == {}

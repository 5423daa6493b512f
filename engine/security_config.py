"""Typed security settings of every Tandem process, and secret hygiene (torch- and gRPC-free).

What a process may be given:
  - TLS: its certificate and key (servers present them; clients present them
    for mutual TLS) and a CA bundle (clients verify servers with it; servers
    verify client certificates with it when ``require_client_cert``);
  - bearer tokens accepted on the public API (router only);
  - the internal token that workers require of callers and the router sends;
  - the largest gRPC message, in bytes.

Secrets never travel on a command line (``ps`` shows it): ``tandem serve``
hands them to its children in the environment variables below, read once by
the CLI entry point. ``repr`` of these configs hides every token, and
:func:`redact_url` hides the password of a Redis URL before it is printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variable with the internal token (set by ``tandem serve`` for its children).
INTERNAL_TOKEN_ENV = "TANDEM_INTERNAL_TOKEN"
#: Environment variable with the public API's bearer tokens, one per line.
AUTH_TOKENS_ENV = "TANDEM_AUTH_TOKENS"
#: Environment variable holding a Redis URL whose password must stay off command lines.
REDIS_URL_ENV = "TANDEM_REDIS_URL"
#: Default largest gRPC message sent or received (bytes).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TlsConfig:
    """Certificate paths (PEM files) of one process.

    Attributes:
        cert: this process's certificate chain; with ``key`` a server serves TLS
            and a client presents it (mutual TLS).
        key: private key of ``cert``.
        ca: CA bundle; clients verify servers with it (``None``: the system
            roots); servers verify client certificates with it.
        require_client_cert: servers refuse clients without a certificate
            signed by ``ca`` (mutual TLS).
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.require_client_cert and (self.ca is None or self.cert is None):
            raise ValueError("--tls-require-client-cert needs --tls-ca, --tls-cert and --tls-key")

    @property
    def server_enabled(self) -> bool:
        """Whether servers of this process serve TLS."""
        return self.cert is not None

    @property
    def client_enabled(self) -> bool:
        """Whether clients of this process dial with TLS."""
        return self.ca is not None or self.cert is not None


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, tokens and message limits of one process.

    Attributes:
        tls: certificate paths (TLS off when empty).
        auth_tokens: bearer tokens accepted on the public API (empty: no
            authentication); router only.
        internal_token: token that workers require on every call (except
            health and reflection) and that the router sends; ``None``: none.
        max_message_bytes: largest gRPC message sent or received (bytes).
    """

    tls: TlsConfig = TlsConfig()
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    internal_token: str | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def secret_env(self) -> dict[str, str]:
        """The environment variables that carry this config's secrets to a child process."""
        env: dict[str, str] = {}
        if self.internal_token:
            env[INTERNAL_TOKEN_ENV] = self.internal_token
        if self.auth_tokens:
            env[AUTH_TOKENS_ENV] = "\n".join(self.auth_tokens)
        return env


def parse_token_lines(text: str) -> list[str]:
    """Tokens of a token file: one per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: a token contains whitespace.
    """
    tokens = []
    for line in text.splitlines():
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(ch.isspace() for ch in token):
            raise ValueError("a bearer token must not contain whitespace")
        tokens.append(token)
    return tokens


def load_auth_tokens(
    inline: list[str] | None, token_file: Path | None, env: Mapping[str, str] = os.environ
) -> tuple[str, ...]:
    """Public API tokens from ``--auth-token`` values, ``--auth-token-file`` and ``$TANDEM_AUTH_TOKENS``.

    Raises:
        OSError: the token file cannot be read.
        ValueError: a token contains whitespace, or the token file is empty.
    """
    tokens = list(inline or [])
    if token_file is not None:
        from_file = parse_token_lines(token_file.read_text())
        if not from_file:
            raise ValueError(f"no token in {token_file}")
        tokens += from_file
    tokens += parse_token_lines(env.get(AUTH_TOKENS_ENV, ""))
    return tuple(dict.fromkeys(tokens))


def redact_url(url: str) -> str:
    """``url`` with its password (and any ``password=`` query value) replaced by ``***``.

    ``redis://user:secret@host:6379/0`` becomes ``redis://user:***@host:6379/0``;
    without a colon the whole user part may be a password (``redis://secret@host``)
    and is hidden too.
    """

    def userinfo(match: re.Match[str]) -> str:
        user, sep, _password = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if sep else f"{match.group(1)}***@"

    url = _USERINFO.sub(userinfo, url, count=1)
    return _PASSWORD_PARAM.sub(r"\1***", url)


def redis_url_env(url: str) -> dict[str, str]:
    """``{REDIS_URL_ENV: url}`` when ``url`` holds a password (a parent hands it to children so), else ``{}``."""
    return {REDIS_URL_ENV: url} if redact_url(url) != url else {}


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@?#]*)@")
_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#]*")

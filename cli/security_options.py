"""Command-line options of TLS, tokens, message and prompt limits and drain, and their configs.

Servers (``router``, ``prefill``, ``decode``, ``serve``) get :func:`add_process_options`;
the public API's options (bearer tokens, ``--max-prompt-tokens``) come with
:func:`add_public_api_options`; clients (``generate``, ``bench``) get :func:`add_client_options`.

Secrets are never turned back into flags (:func:`security_flags`): a parent hands them to
its children in the environment (``SecurityConfig.secret_env``), and a process reads them
from there when no flag gives them (:func:`security_config_from_args`). Torch- and gRPC-free.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping

from cli.validators import bytes_limit, existing_file, non_negative_float
from engine.security_config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INTERNAL_TOKEN_ENV,
    SecurityConfig,
    TlsConfig,
    load_auth_tokens,
)

DEFAULT_DRAIN_TIMEOUT_S = 30.0


def _add_tls(group: argparse._ArgumentGroup, *, server: bool) -> None:
    group.add_argument(
        "--tls-cert",
        type=existing_file,
        metavar="PEM",
        help="certificate chain: servers serve TLS with it; clients present it (mutual TLS)",
    )
    group.add_argument("--tls-key", type=existing_file, metavar="PEM", help="private key of --tls-cert")
    group.add_argument(
        "--tls-ca",
        type=existing_file,
        metavar="PEM",
        help="CA bundle: clients verify servers with it"
        + ("; servers verify client certificates with it" if server else ""),
    )


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """Adds TLS, ``--internal-token``, ``--max-message-bytes`` and ``--drain-timeout-s``."""
    group = parser.add_argument_group("security and shutdown")
    _add_tls(group, server=True)
    group.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        help="servers refuse clients without a certificate signed by --tls-ca (mutual TLS)",
    )
    group.add_argument(
        "--internal-token",
        metavar="TOKEN",
        help=f"token workers require of callers and the router sends (default: ${INTERNAL_TOKEN_ENV}; "
        "`serve` generates one per run); prefer the environment variable: flags show in ps",
    )
    group.add_argument(
        "--max-message-bytes",
        type=bytes_limit,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="N",
        help="largest gRPC message sent or received, in bytes (default: %(default)s)",
    )
    group.add_argument(
        "--drain-timeout-s",
        type=non_negative_float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="S",
        help="on SIGTERM, seconds requests in flight get to finish (default: %(default)s)",
    )


def add_public_api_options(parser: argparse.ArgumentParser) -> None:
    """Adds ``--auth-token`` (repeatable), ``--auth-token-file`` and ``--max-prompt-tokens``."""
    group = parser.add_argument_group("public API")
    group.add_argument(
        "--auth-token",
        action="append",
        metavar="TOKEN",
        help="bearer token accepted on the public API (repeatable; also $TANDEM_AUTH_TOKENS, one per line)",
    )
    group.add_argument(
        "--auth-token-file",
        type=existing_file,
        metavar="FILE",
        help="file of accepted bearer tokens, one per line ('#' comments)",
    )
    group.add_argument(
        "--max-prompt-tokens",
        type=_positive_int,
        metavar="N",
        help="longest prompt accepted, in tokens; longer ones get INVALID_ARGUMENT (default: no limit "
        "besides --max-model-len)",
    )


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Adds the client's TLS options and ``--auth-token``."""
    group = parser.add_argument_group("security")
    _add_tls(group, server=False)
    group.add_argument("--auth-token", metavar="TOKEN", help="bearer token sent to the router")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _fail(message: str) -> SystemExit:
    print(f"tandem: error: {message}", file=sys.stderr)
    return SystemExit(2)


def tls_config_from_args(args: argparse.Namespace) -> TlsConfig:
    """The TLS paths of the parsed options; exits with status 2 on a bad combination."""
    try:
        return TlsConfig(
            cert=args.tls_cert,
            key=args.tls_key,
            ca=args.tls_ca,
            require_client_cert=getattr(args, "tls_require_client_cert", False),
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None


def security_config_from_args(
    args: argparse.Namespace, *, public: bool, env: Mapping[str, str] = os.environ
) -> SecurityConfig:
    """A server's security config: flags first, then the secrets in ``env``.

    ``public`` (the router) also reads the bearer tokens. Exits with status 2 on
    a bad TLS combination or an unreadable or malformed token file.
    """
    tokens: tuple[str, ...] = ()
    if public:
        try:
            tokens = load_auth_tokens(args.auth_token, args.auth_token_file, env)
        except (OSError, ValueError) as exc:
            raise _fail(f"--auth-token-file: {exc}") from None
    return SecurityConfig(
        tls=tls_config_from_args(args),
        auth_tokens=tokens,
        internal_token=args.internal_token or env.get(INTERNAL_TOKEN_ENV) or None,
        max_message_bytes=args.max_message_bytes,
    )


def cluster_security(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> SecurityConfig:
    """``tandem serve``'s config: the public tokens, and an internal token (given, or new)."""
    security = security_config_from_args(args, public=True, env=env)
    if security.internal_token is None:
        security = SecurityConfig(
            tls=security.tls,
            auth_tokens=security.auth_tokens,
            internal_token=secrets.token_urlsafe(32),
            max_message_bytes=security.max_message_bytes,
        )
    return security


def client_security_from_args(args: argparse.Namespace) -> SecurityConfig:
    """A client's config (TLS only; the bearer token stays in ``args.auth_token``)."""
    return SecurityConfig(tls=tls_config_from_args(args))


def security_flags(security: SecurityConfig) -> list[str]:
    """Flags that give a child ``security`` without its secrets (those go in the environment);
    defaults are left out."""
    tls = security.tls
    flags = []
    if security.max_message_bytes != DEFAULT_MAX_MESSAGE_BYTES:
        flags += ["--max-message-bytes", str(security.max_message_bytes)]
    for flag, path in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca)):
        if path is not None:
            flags += [flag, str(path)]
    if tls.require_client_cert:
        flags.append("--tls-require-client-cert")
    return flags


def drain_flags(drain_timeout_s: float) -> list[str]:
    """``--drain-timeout-s`` unless it is the default."""
    return [] if drain_timeout_s == DEFAULT_DRAIN_TIMEOUT_S else ["--drain-timeout-s", repr(drain_timeout_s)]

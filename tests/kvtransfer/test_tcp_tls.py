"""TLS and mutual TLS on the tcp backend, with certificates made in the test (127.0.0.1 only).

A transfer over TLS writes exactly the sent blocks; a plaintext sender, a sender
with a certificate of another CA, or one without a certificate (under mutual TLS)
is refused before anything is written; a sender refuses a receiver whose
certificate it cannot verify.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from engine.errors import TransferFailed
from engine.security_config import SecurityConfig, TlsConfig
from engine.worker_config import WorkerConfig
from kvtransfer.tcp import TcpKvReceiver, client_ssl_context, server_ssl_context
from prefill_service.server import make_sender
from tests.helpers.certs import Pki, make_pki
from tests.kvtransfer import DST_BLOCKS, EPOCH, SRC_BLOCKS, destination, make_layout, random_cache, zero_cache


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki, *, mutual: bool) -> TlsConfig:
    return TlsConfig(cert=pki.server_cert, key=pki.server_key, ca=pki.ca, require_client_cert=mutual)


def transfer(
    receiver_tls: TlsConfig, sender_tls: TlsConfig | None, transport: str = "tcp"
) -> tuple[torch.Tensor, torch.Tensor, TransferFailed | None]:
    """Send :data:`SRC_BLOCKS` once with the prefill worker's sender of ``transport``
    (:func:`prefill_service.server.make_sender`); returns (source cache, destination cache, the send's error)."""
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> TransferFailed | None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH, ssl_context=server_ssl_context(receiver_tls))
        address = await receiver.start()
        receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        security = SecurityConfig(tls=sender_tls or TlsConfig())
        sender = make_sender(
            WorkerConfig("prefill", kv_transport=transport, security=security), layout, "prefill-0"
        )
        try:
            stats = await sender.send("req-1", destination(address, layout), SRC_BLOCKS, src)
            done = await receiver.wait_complete("res-1", timeout_s=5)
            assert (done.block_ids, stats.num_blocks) == (tuple(DST_BLOCKS), 3)
            return None
        except TransferFailed as exc:
            return exc
        finally:
            await sender.close()
            await receiver.close()

    error = asyncio.run(scenario())
    return src, dst, error


def test_contexts_follow_the_tls_config(pki: Pki) -> None:
    import ssl

    assert server_ssl_context(TlsConfig()) is None
    assert client_ssl_context(TlsConfig()) is None
    assert server_ssl_context(TlsConfig(ca=pki.ca)) is None  # no certificate: the receiver stays plaintext
    modes = [
        server_ssl_context(TlsConfig(cert=pki.server_cert, key=pki.server_key)),
        server_ssl_context(server_tls(pki, mutual=False)),
        server_ssl_context(server_tls(pki, mutual=True)),
    ]
    assert [ctx.verify_mode for ctx in modes if ctx] == [ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED]
    client = client_ssl_context(TlsConfig(ca=pki.ca))
    assert client is not None and client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mutual", [False, True])
def test_transfer_over_tls_writes_exactly_the_sent_blocks(pki: Pki, mutual: bool) -> None:
    sender = TlsConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    src, dst, error = transfer(server_tls(pki, mutual=mutual), sender)
    assert error is None
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    untouched = [b for b in range(6) if b not in DST_BLOCKS]
    assert not dst[:, :, untouched].any()


def test_server_only_tls_accepts_a_sender_without_a_certificate(pki: Pki) -> None:
    src, dst, error = transfer(server_tls(pki, mutual=False), TlsConfig(ca=pki.ca))
    assert error is None
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


def rogue(pki: Pki) -> TlsConfig:
    return TlsConfig(cert=pki.rogue_cert, key=pki.rogue_key, ca=pki.ca)


@pytest.mark.parametrize(
    ("mutual", "sender", "message"),
    [
        pytest.param(False, lambda pki: None, "KV transfer to", id="plaintext-sender"),
        pytest.param(True, lambda pki: None, "KV transfer to", id="plaintext-sender-mtls"),
        pytest.param(True, lambda pki: TlsConfig(ca=pki.ca), "KV transfer to", id="no-client-cert-mtls"),
        pytest.param(True, rogue, "KV transfer to", id="cert-of-another-ca-mtls"),
        pytest.param(False, rogue, "KV transfer to", id="cert-of-another-ca"),
        pytest.param(
            False,
            lambda pki: TlsConfig(cert=pki.client_cert, key=pki.client_key),  # system roots only
            "CERTIFICATE_VERIFY_FAILED",
            id="receiver-not-trusted",
        ),
    ],
)
def test_untrusted_peers_are_refused_before_anything_is_written(
    pki: Pki, mutual: bool, sender: Callable[[Pki], TlsConfig | None], message: str
) -> None:
    _, dst, error = transfer(server_tls(pki, mutual=mutual), sender(pki))
    assert error is not None and message in str(error)
    assert not dst.any()


def test_plaintext_receiver_is_refused_by_a_tls_sender(pki: Pki) -> None:
    _, dst, error = transfer(TlsConfig(), TlsConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca))
    assert error is not None and "cannot connect to KV receiver" in str(error)
    assert not dst.any()


@pytest.mark.parametrize("mutual", [False, True])
def test_auto_transfer_to_a_tls_receiver_writes_exactly_the_sent_blocks(pki: Pki, mutual: bool) -> None:
    sender = TlsConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    src, dst, error = transfer(server_tls(pki, mutual=mutual), sender, transport="auto")
    assert error is None
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    untouched = [b for b in range(6) if b not in DST_BLOCKS]
    assert not dst[:, :, untouched].any()


def test_auto_plaintext_sender_is_refused_by_a_tls_receiver(pki: Pki) -> None:
    _, dst, error = transfer(server_tls(pki, mutual=False), None, transport="auto")
    assert error is not None and "KV transfer to" in str(error)
    assert not dst.any()

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
import trio

from common.errors import ConfigurationError
from common.tls import TlsSettings, client_context, ensure_dev_certificates, server_context


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve_one(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        stream = await listeners[0].accept()
        tls = trio.SSLStream(stream, server, server_side=True)
        try:
            await tls.do_handshake()
            await tls.send_all(b"hello")
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_one)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, client, server_hostname=hostname)
        try:
            await tls.do_handshake()
            assert await tls.receive_some(5) == b"hello"
        except trio.BrokenResourceError as exc:
            failure = exc.__cause__ or exc  # trio wraps the ssl error
        finally:
            await trio.aclose_forcefully(tls)
            await listeners[0].aclose()
    if failure is not None:
        raise failure


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
async def test_dev_certificates_verify_for_local_names(tmp_path: Path, hostname: str) -> None:
    certs = ensure_dev_certificates(tmp_path)
    with trio.fail_after(10):
        await _handshake(
            server_context(certs.tls_settings(), alpn=()), client_context(certs.ca_cert), hostname
        )


async def test_a_wrong_hostname_fails_verification(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(tmp_path)
    with trio.fail_after(10), pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(
            server_context(certs.tls_settings(), alpn=()),
            client_context(certs.ca_cert),
            "evil.example",
        )


async def test_an_untrusting_client_refuses_the_dev_ca(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(tmp_path)
    with trio.fail_after(10), pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(
            server_context(certs.tls_settings(), alpn=()), client_context(), "localhost"
        )


def test_reuse_is_byte_identical_and_keys_are_private(tmp_path: Path) -> None:
    first = ensure_dev_certificates(tmp_path)
    before = {p: p.read_bytes() for p in (first.ca_cert, first.server_cert, first.server_key)}
    second = ensure_dev_certificates(tmp_path)
    assert {p: p.read_bytes() for p in before} == before
    assert second == first
    for key in (first.server_key, tmp_path / "tls" / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_a_new_hostname_reissues_only_the_leaf(tmp_path: Path) -> None:
    first = ensure_dev_certificates(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    leaf_before = first.server_cert.read_bytes()
    ensure_dev_certificates(tmp_path, ("localhost", "huleedu.test"))
    assert first.ca_cert.read_bytes() == ca_before
    assert first.server_cert.read_bytes() != leaf_before


def test_missing_certfile_is_named(tmp_path: Path) -> None:
    settings = TlsSettings(certfile=tmp_path / "nope.pem", keyfile=tmp_path / "nope-key.pem")
    with pytest.raises(ConfigurationError) as info:
        server_context(settings)
    assert info.value.field == "certfile"


def test_a_key_that_does_not_match_is_named(tmp_path: Path) -> None:
    a = ensure_dev_certificates(tmp_path / "a")
    b = ensure_dev_certificates(tmp_path / "b")
    settings = TlsSettings(certfile=a.server_cert, keyfile=b.server_key)
    with pytest.raises(ConfigurationError) as info:
        server_context(settings)
    assert info.value.field == "keyfile"


def test_client_contexts_are_fresh_and_verifying() -> None:
    one, two = client_context(alpn=["h2"]), client_context()
    assert one is not two
    assert one.verify_mode is ssl.CERT_REQUIRED and one.check_hostname

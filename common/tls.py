"""TLS: server and client contexts from settings, and a local dev CA for the dev stack.

* :func:`server_context` / :func:`configure_hypercorn` load the configured certificate and key
  at start-up, so a missing file or a key that does not match its certificate fails at once
  with a :class:`~common.errors.ConfigurationError` naming the setting.
* :func:`client_context` builds a **fresh** verifying context per call: httpx with HTTP/2 sets
  ALPN on the context it is given, which then breaks WebSocket handshakes that share it.
  Verification is always on.
* :func:`ensure_dev_certificates` makes (or reuses) a dev CA and a server certificate for
  localhost in a state folder; print the CA path so clients can trust it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigurationError

__all__ = [
    "DevCertificates",
    "TlsSettings",
    "client_context",
    "configure_hypercorn",
    "ensure_dev_certificates",
    "server_context",
]

DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = dt.timedelta(days=3650)
#: Browsers refuse leaf certificates valid for longer than 398 days.
LEAF_VALIDITY = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)


class TlsSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    certfile: Path | None = None
    keyfile: Path | None = None
    #: CA bundle for verifying peers (clients of our backends, mTLS); None = system store.
    cafile: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


def _version(name: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if name == "TLSv1.3" else ssl.TLSVersion.TLSv1_2


def _require(path: Path | None, field: str) -> Path:
    if path is None:
        raise ConfigurationError(f"{field} is not set", field=field)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigurationError(f"{field} {path} is missing or unreadable", field=field)
    return path


def server_context(
    settings: TlsSettings, *, alpn: Sequence[str] = ("h2", "http/1.1")
) -> ssl.SSLContext:
    """A server context with the configured certificate; fails naming the bad setting."""
    cert = _require(settings.certfile, "certfile")
    key = _require(settings.keyfile, "keyfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _version(settings.min_version)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"keyfile {key} does not match certfile {cert} or is not a key: {exc.reason}",
            field="keyfile",
        ) from None
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def configure_hypercorn(settings: TlsSettings, config: Any) -> None:
    """Set a Hypercorn ``Config``'s TLS fields, after checking the files load together."""
    server_context(settings)
    config.certfile = str(settings.certfile)
    config.keyfile = str(settings.keyfile)
    config.alpn_protocols = ["h2", "http/1.1"]
    config.ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20"


def client_context(
    cafile: Path | str | None = None, *, alpn: Sequence[str] | None = None
) -> ssl.SSLContext:
    """A fresh verifying client context (trusting ``cafile`` if given, else the system)."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


@dataclass(frozen=True, slots=True)
class DevCertificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def tls_settings(self) -> TlsSettings:
        return TlsSettings(certfile=self.server_cert, keyfile=self.server_key, cafile=self.ca_cert)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _san(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _key_usage(*, signer: bool) -> x509.KeyUsage:
    """Key usage of a CA (signs certificates) or of a TLS server leaf (signs handshakes)."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signer,
        crl_sign=signer,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HuleEdu local development CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(signer=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _new_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signer=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _leaf_usable(
    leaf: x509.Certificate, ca: x509.Certificate, hostnames: Sequence[str], now: dt.datetime
) -> bool:
    if leaf.not_valid_after_utc - RENEW_BEFORE < now or leaf.issuer != ca.subject:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(_san(hostnames)) <= set(san)


def ensure_dev_certificates(
    state_dir: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> DevCertificates:
    """The dev CA and a server certificate for ``hostnames`` under ``state_dir/tls``.

    Existing files are reused while valid (CA and leaf not within 30 days of expiry, the
    leaf signed by that CA and covering every hostname); otherwise what is stale is made anew.
    Keys are written with mode 0600, every file atomically.
    """
    if not hostnames:
        raise ConfigurationError("at least one hostname is needed", field="hostnames")
    folder = state_dir / "tls"
    paths = DevCertificates(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")
    ca_key_path = folder / "ca-key.pem"
    now = dt.datetime.now(dt.UTC)
    ca_key: ec.EllipticCurvePrivateKey | None = None
    ca_cert: x509.Certificate | None = None
    if paths.ca_cert.is_file() and ca_key_path.is_file():
        loaded_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        loaded_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if (
            isinstance(loaded_key, ec.EllipticCurvePrivateKey)
            and loaded_cert.not_valid_after_utc - RENEW_BEFORE > now
        ):
            ca_key, ca_cert = loaded_key, loaded_cert
    fresh_ca = ca_cert is None or ca_key is None
    if ca_cert is None or ca_key is None:
        ca_key, ca_cert = _new_ca(now)
        _write_atomic(ca_key_path, _key_pem(ca_key), 0o600)
        _write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    leaf_ok = (
        not fresh_ca
        and paths.server_cert.is_file()
        and paths.server_key.is_file()
        and _leaf_usable(
            x509.load_pem_x509_certificate(paths.server_cert.read_bytes()), ca_cert, hostnames, now
        )
    )
    if not leaf_ok:
        key, cert = _new_leaf(ca_key, ca_cert, hostnames, now)
        _write_atomic(paths.server_key, _key_pem(key), 0o600)
        _write_atomic(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths

"""A throwaway certificate authority for the sandbox, made at run time.

:func:`ensure_certs` writes ``ca.pem``, ``ca-key.pem``, ``server.pem`` and
``server-key.pem`` into a folder (keys mode 0600) and reuses them on the next
run while they are valid and cover the names asked for. The server
certificate names ``localhost``, ``127.0.0.1``, ``::1`` and any extra DNS names
(wildcards such as ``*.notify.windows.com`` work). Clients trust the sandbox by
trusting ``ca.pem`` (:meth:`SandboxCerts.client_ssl_context`); client
certificates for APNs certificate auth come from
:meth:`SandboxCerts.issue_client_certificate`.

Keys are ECDSA P-256: fast to make and to handshake with. Nothing here is
meant to protect anything; it exists so that tests use real TLS.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=7)
"""Certificates closer than this to expiry are made again."""
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1", "::1")
DEFAULT_SERVER_ALPN = ("h2", "http/1.1")

ClientAuth = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A client certificate and its key, as files (PEM)."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class SandboxCerts:
    """The files of one sandbox CA and its server certificate."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def server_ssl_context(
        self,
        *,
        alpn: Sequence[str] = DEFAULT_SERVER_ALPN,
        client_auth: ClientAuth = "none",
    ) -> ssl.SSLContext:
        """A TLS 1.2+ server context offering ``alpn``.

        ``client_auth`` ``"required"`` refuses clients without a certificate
        signed by this CA; ``"optional"`` verifies one if presented (APNs takes
        certificate and token auth on the same host).
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server_cert, self.server_key)
        context.set_alpn_protocols(list(alpn))
        if client_auth != "none":
            context.load_verify_locations(cafile=self.ca_cert)
            required = client_auth == "required"
            context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        return context

    def client_ssl_context(
        self,
        *,
        alpn: Sequence[str] = ("h2",),
        client_cert: ClientCertificate | None = None,
    ) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(alpn))
        if client_cert is not None:
            context.load_cert_chain(client_cert.cert, client_cert.key)
        return context

    def issue_client_certificate(
        self,
        name: str,
        *,
        common_name: str | None = None,
        user_id: str | None = None,
        days: int = LEAF_DAYS,
    ) -> ClientCertificate:
        """Sign a client certificate with the CA and write ``<name>.pem`` and
        ``<name>-key.pem`` to the folder (a new key each call).

        ``user_id`` goes into the subject's UID attribute, where an APNs
        certificate carries its bundle id (topic).
        """
        ca_key = _load_key(self.ca_key)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)]
        if user_id is not None:
            attributes.append(x509.NameAttribute(NameOID.USER_ID, user_id))
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _leaf_builder(x509.Name(attributes), key, ca_cert, days)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        result = ClientCertificate(
            self.folder / f"{name}.pem", self.folder / f"{name}-key.pem"
        )
        _write_key(result.key, key)
        _write(result.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return result


def ensure_certs(
    folder: Path | str,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
) -> SandboxCerts:
    """Return the sandbox certificates in ``folder``, making them if missing,
    expiring, broken or not covering ``dns_names``/``ip_addresses`` (added to
    the defaults). Safe to call from several processes at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    certs = SandboxCerts(
        folder=folder,
        ca_cert=folder / "ca.pem",
        ca_key=folder / "ca-key.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server-key.pem",
    )
    dns = sorted({*DEFAULT_DNS_NAMES, *dns_names})
    ips = sorted({*DEFAULT_IP_ADDRESSES, *ip_addresses})
    with _locked(folder / ".lock"):
        if not _usable(certs, dns, ips):
            _create(certs, dns, ips)
    return certs


def _usable(certs: SandboxCerts, dns: list[str], ips: list[str]) -> bool:
    """True if the files exist, match each other, cover the names and last."""
    try:
        ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
        leaf = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
        ca_key = _load_key(certs.ca_key)
        leaf_key = _load_key(certs.server_key)
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound):
        return False
    horizon = dt.datetime.now(dt.UTC) + RENEW_BEFORE
    names = set(san.value.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in san.value.get_values_for_type(x509.IPAddress)}
    return (
        _same_key(ca_key, ca)
        and _same_key(leaf_key, leaf)
        and ca.not_valid_after_utc > horizon
        and leaf.not_valid_after_utc > horizon
        and names >= set(dns)
        and addresses >= {str(ipaddress.ip_address(ip)) for ip in ips}
    )


def _create(certs: SandboxCerts, dns: list[str], ips: list[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "pushstream sandbox CA")]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])])
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    leaf = (
        _leaf_builder(subject, key, ca_cert, LEAF_DAYS)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_key(certs.ca_key, ca_key)
    _write_key(certs.server_key, key)
    _write(certs.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write(certs.server_cert, leaf.public_bytes(pem), 0o644)


def _leaf_builder(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path} does not hold an EC private key")
    return key


def _same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return key.public_key() == cert.public_key()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, data, 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically, with ``mode`` set before any byte lands on disk."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(tmp, mode)  # umask may have narrowed it; 0600 stays 0600
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

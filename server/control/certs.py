"""``fed-server certs``: a private CA and a server certificate for the gateway and the loopback SuperLink.

Sites trust only ``ca.crt`` (passed to ``fed-client join --root-certificates``). The server certificate carries a
SAN for the public name sites dial and for 127.0.0.1 / localhost (the SuperLink on loopback, which ``fed-server``,
the gateway and Flower's own helpers reach there). Built with the ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.common.errors import ConfigError

#: Names every server certificate carries besides the public ones (the SuperLink listens on loopback).
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class CertFiles:
    """The files :func:`make_certificates` writes (``ca.key`` never leaves the operator)."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.unlink(missing_ok=True)  # a new file, never an old one's permissions (or a link planted there)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedseg federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _server(
    names: Sequence[str], ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def server_names(hosts: Sequence[str]) -> list[str]:
    """The certificate's SANs: the public names in order, then the loopback names, without duplicates."""
    names: list[str] = []
    for name in [*hosts, *LOOPBACK_NAMES]:
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def make_certificates(out: Path, hosts: Sequence[str], force: bool = False) -> CertFiles:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` for ``hosts`` into ``out``.

    Raises:
        ConfigError: no host given, or ``out`` already holds a CA key (pass ``force`` to replace it).
    """
    if not [h for h in hosts if h.strip()]:
        raise ConfigError("pass --host NAME: the name or IP address sites dial")
    files = CertFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    if files.ca_key.exists() and not force:
        raise ConfigError(f"{files.ca_key} exists; refusing to replace the CA sites trust (pass --force to do so)")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca = _ca(now)
    key, cert = _server(server_names(hosts), ca_key, ca, now)
    _write_key(files.ca_key, ca_key)
    _write_key(files.key, key)
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files

"""Test certificate authorities: a CA, a server certificate for 127.0.0.1 and a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "s3cret-token-for-tests-0123456789"


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    not_before: datetime.datetime | None = None,
) -> x509.Certificate:
    now = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_pki(root: Path, label: str) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert(f"{label} CA", ca_key, None, ca=True)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (root / "ca.pem").write_bytes(pem(ca))
    server_key, client_key = _key(), _key()
    (root / "server.pem").write_bytes(pem(_cert("worker", server_key, (ca, ca_key), server=True)))
    (root / "client.pem").write_bytes(pem(_cert("scheduler", client_key, (ca, ca_key))))
    return Pki(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=_write_key(server_key, root / "server.key"),
        client_cert=root / "client.pem",
        client_key=_write_key(client_key, root / "client.key"),
    )

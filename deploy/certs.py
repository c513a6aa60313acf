"""TLS certificates for a SuperLink and authentication keys for SuperNodes, made in Python.

Uses only the `cryptography` package (a Flower dependency), so no `openssl` or `ssh-keygen` binary is
needed. `generate(out, host, nodes=N)` writes:

    ca.crt, ca.key                  a self-signed CA (ECDSA P-384), 0600 on the key
    server.pem, server.key          the SuperLink's certificate, signed by the CA; its SAN names `host`
                                    (a DNS name or an IP address), any `extra_hosts`, and always
                                    localhost, 127.0.0.1 and ::1 (the SuperLink's own ServerApp runtime
                                    connects to it on loopback with the same certificate)
    node-0, node-0.pub, ...         SuperNode key pairs: ECDSA P-384 in OpenSSH format (what
                                    `ssh-keygen -t ecdsa -b 384` writes), 0600 on the private keys

SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
            --enable-supernode-auth
Register:   flwr supernode register node-0.pub CONNECTION
SuperNode:  flower-supernode --root-certificates ca.crt --auth-supernode-private-key node-0
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class Certificates:
    """Paths of what `generate` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key of node_keys[i] is node_keys[i] + ".pub"

    def node_public(self, i: int) -> Path:
        return self.node_keys[i].with_name(self.node_keys[i].name + ".pub")


def _write(path: Path, data: bytes, private: bool) -> Path:
    """Write a file; a private key is created with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        if path.exists():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)  # in case the umask stripped bits we did not ask for
    else:
        path.write_bytes(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_ca(common_name: str = "cut-fl CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str,
                     extra_hosts: tuple[str, ...] = (), days: int = 825
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for `host` (DNS name or IP), its `extra_hosts` and the loopback names."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries([host, *extra_hosts, *LOOPBACK])), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key(comment: str = "") -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair in OpenSSH format: (private key file, public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def write_node_key(path: Path, comment: str = "") -> Path:
    """Write `path` (private, 0600) and `path.pub`; returns the private key's path."""
    private, public = make_node_key(comment or path.name)
    _write(path, private, private=True)
    _write(path.with_name(path.name + ".pub"), public, private=False)
    return path


def generate(out: Path, host: str, nodes: int = 0, extra_hosts: tuple[str, ...] = (),
             node_prefix: str = "node") -> Certificates:
    """CA + server certificate for `host`, and `nodes` SuperNode key pairs, under `out`."""
    if not host.strip():
        raise ValueError("certs: --host is empty")
    if nodes < 0:
        raise ValueError("certs: the number of nodes must be >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, host, extra_hosts)
    pem = serialization.Encoding.PEM
    paths = Certificates(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem), private=False),
        ca_key=_write(out / "ca.key", _pem_key(ca_key), private=True),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(pem), private=False),
        server_key=_write(out / "server.key", _pem_key(server_key), private=True),
        node_keys=tuple(write_node_key(out / f"{node_prefix}-{i}") for i in range(nodes)),
    )
    return paths


def san_names(cert_path: Path) -> list[str]:
    """The names and addresses a certificate is valid for (for checks and `cutfl certs` output)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


__all__ = ["Certificates", "generate", "make_ca", "make_node_key", "make_server_cert", "san_names", "write_node_key"]

"""Self-signed TLS credentials for a federation: a CA, and a server certificate it signs.

For trying a federation out and for the tests.  A hospital network normally issues its own certificates:
pass those to ``tcurlora federated server --tls-dir`` instead (same three file names).  The server
certificate must also name 127.0.0.1: Flower's SuperLink reaches its own API over loopback with it.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Dict, Sequence

from ..errors import TCURLoRAError

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def generate_certificates(folder, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365) -> Path:
    """Write ca.crt, server.pem and server.key (EC P-256) for ``hosts`` (and loopback, which the SuperLink's own
    processes use) into ``folder``; returns the folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from ..atomic import atomic_write
    from .keys import write_secret

    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcurlora federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    names = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_NAMES]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    key_bytes = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for name, data in ((CA_CERT, ca.public_bytes(pem)), (SERVER_CERT, cert.public_bytes(pem))):
        atomic_write(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    write_secret(folder / SERVER_KEY, key_bytes)
    return folder


def server_certificate_files(folder) -> Dict[str, Path]:
    """The paths of ``folder``'s CA certificate, server certificate and key, as Flower's SuperLink takes them,
    after checking they are PEM files and that the certificate names 127.0.0.1."""
    from cryptography import x509

    folder = Path(folder)
    files = {"ca": folder / CA_CERT, "cert": folder / SERVER_CERT, "key": folder / SERVER_KEY}
    data = {k: _read(p) for k, p in files.items()}
    try:
        cert = x509.load_pem_x509_certificate(data["cert"])
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise TCURLoRAError(f"{SERVER_CERT}: not a server certificate with subject alternative names ({exc})") from None
    if ipaddress.ip_address("127.0.0.1") not in names.get_values_for_type(x509.IPAddress):
        raise TCURLoRAError(f"{SERVER_CERT}: the certificate must also name 127.0.0.1 (Flower's SuperLink connects "
                            "to itself over loopback); `tcurlora federated certs` adds it")
    return {k: p.absolute() for k, p in files.items()}


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TCURLoRAError(f"{path.name}: cannot read the TLS file ({exc.strerror or exc}); "
                            "create one with `tcurlora federated certs`") from None
    if b"-----BEGIN" not in data:
        raise TCURLoRAError(f"{path.name}: not a PEM certificate or key")
    return data


def read_root_certificate(path) -> bytes:
    return _read(Path(path))

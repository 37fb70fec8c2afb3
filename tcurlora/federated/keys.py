"""Site keys: Flower's SuperNode authentication, so that the server admits only the sites it was started for.

Each site makes a key pair once (``tcurlora federated keys --site NAME``: ``NAME.key`` stays at the site,
``NAME.pub`` goes to the server operator).  ``tcurlora federated server --site-keys`` registers each listed
public key with its SuperLink (``flwr supernode register``, Flower's node authentication with
``--enable-supernode-auth``); a site's SuperNode signs every request with its private key
(``--auth-supernode-private-key``).  A SuperNode whose key is not registered is refused.  The keys are ECDSA
P-384 in OpenSSH format, as Flower reads them (``ssh-keygen -t ecdsa -b 384`` makes the same kind); the site's
name at the server is its ``.pub`` file's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence, Tuple

from ..errors import TCURLoRAError, display_name
from .checks import check_site_name

PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"


def generate_site_key(folder, site: str) -> Tuple[Path, Path]:
    """Write ``SITE.key`` (private, mode 600) and ``SITE.pub`` into ``folder``; refuses to overwrite a key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ..atomic import atomic_write

    check_site_name(site, "--site")
    folder = Path(folder)
    private, public = folder / f"{site}{PRIVATE_SUFFIX}", folder / f"{site}{PUBLIC_SUFFIX}"
    for path in (private, public):
        if path.exists():
            raise TCURLoRAError(f"{path.name}: already exists; a site keeps its key (remove it to make a new one)")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_secret(private, private_bytes)
    atomic_write(public, lambda tmp: Path(tmp).write_bytes(public_bytes + f" {site}\n".encode()))
    return private, public


def write_secret(path, data: bytes) -> None:
    """Write a private key atomically, readable by its owner only from its first byte on."""
    from ..atomic import atomic_write

    def write(tmp):
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)

    atomic_write(path, write)


def check_private_key(path) -> Path:
    """A site's private key file as Flower's SuperNode reads it (OpenSSH, elliptic curve), checked."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path)
    _read_key(path, lambda data: load_ssh_private_key(data, None), ec.EllipticCurvePrivateKey,
              "an unencrypted OpenSSH ECDSA private key (make one with `tcurlora federated keys`)")
    return path.absolute()


def site_public_keys(paths: Sequence) -> Dict[str, Path]:
    """The server's list of sites: ``.pub`` files (or folders of them) as {site name: file}, each checked."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise TCURLoRAError(f"{display_name(path)}: no such site key file or folder")
        found = sorted(path.glob(f"*{PUBLIC_SUFFIX}")) if path.is_dir() else [path]
        if not found:
            raise TCURLoRAError(f"{display_name(path)}: no site keys (*{PUBLIC_SUFFIX}) in this folder")
        files += found
    sites: Dict[str, Path] = {}
    for path in files:
        if not path.name.endswith(PUBLIC_SUFFIX):
            raise TCURLoRAError(f"{display_name(path)}: a site's public key file is named SITE{PUBLIC_SUFFIX}")
        name = check_site_name(path.name[:-len(PUBLIC_SUFFIX)], display_name(path))
        _read_key(path, load_ssh_public_key, ec.EllipticCurvePublicKey,
                  "an OpenSSH ECDSA public key (a site's .pub from `tcurlora federated keys`)")
        if name in sites:
            raise TCURLoRAError(f"{display_name(path)}: site {name} is listed twice")
        sites[name] = path.absolute()
    return sites


def _read_key(path: Path, load, kind, what: str):
    """The key ``load`` reads from ``path``; one line naming the file unless it is a ``kind``."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = load(path.read_bytes())
    except OSError as exc:
        raise TCURLoRAError(f"{display_name(path)}: cannot read the site key ({exc.strerror or exc})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, kind):
        raise TCURLoRAError(f"{display_name(path)}: not {what}")
    return key

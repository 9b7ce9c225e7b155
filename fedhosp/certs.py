"""The provisioning kit: a consortium CA, the coordinator's TLS certificate, each hospital's key pair.

TLS needs a CA the hospitals trust and a server certificate whose subject alternative
names match every address hospitals dial (a mismatch fails the handshake). SuperNode
authentication needs one EC key pair per hospital in OpenSSH format, which is what
Flower 1.41 reads (`flwr supernode register` takes the public key, `flower-supernode
--auth-supernode-private-key` the private one). A hospital makes its pair on its own
machine and sends only the `.pub`: the private key never leaves the site's folder.
Private keys are created 0600 and never overwritten.

The CA key signs whatever hospitals will trust, so it never sits in the folder the server
reads (`--certs`, mounted into the coordinator's container): `init` writes it to a folder of
its own beside it (`ca_dir`: `certs/` -> `certs-ca/`, 0700) to be kept offline, and the
coordinator refuses a `--certs` folder that holds one (`ServerCerts.check`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_DIR_SUFFIX = "-ca"  # `--out certs` puts the CA key in `certs-ca/`
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
# The coordinator reaches its own SuperLink on loopback (Control API, `flwr` CLI, the
# ServerApp's Runtime API), so the server certificate always names loopback too.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1()  # a NIST curve: Flower's SuperNode authentication accepts only those
CA_DAYS, SERVER_DAYS = 3650, 825
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class ServerCerts:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, folder: Path, ca_folder: Path | None = None) -> ServerCerts:
        """The files `init(folder)` writes; the CA key is in `ca_folder` (default `ca_dir(folder)`)."""
        ca_key = (ca_folder or ca_dir(folder)) / CA_KEY
        return cls(folder / CA_CERT, ca_key, folder / SERVER_CERT, folder / SERVER_KEY)

    def check(self) -> None:
        """The files a SuperLink needs, and no CA key beside them: whoever reads the server's folder
        (its container, a backup, a compromised SuperLink) must not be able to mint certificates."""
        for path in (self.ca_cert, self.cert, self.key):
            if not path.is_file():
                raise ConfigError(f"{path}: missing; create the certificates with `fedhosp certs init --out DIR`")
        stray = self.cert.parent / CA_KEY
        if stray.exists():
            raise ConfigError(f"{stray}: the CA key is in the server's certificate folder; move it offline "
                              f"(`fedhosp certs init` keeps it in {ca_dir(self.cert.parent)}/) and start again")


@dataclass(frozen=True)
class SiteKeys:
    private: Path
    public: Path


def ca_dir(out: Path) -> Path:
    """Where `init(out)` keeps the CA key: a folder beside `out`, never inside it."""
    base = out if out.name else out.resolve()
    return base.with_name(base.name + CA_DIR_SUFFIX)


def init(out: Path, server_names: list[str], ca_out: Path | None = None) -> ServerCerts:
    """Create a CA and a server certificate for `server_names` (host names and IP addresses) in `out`;
    the CA key goes to `ca_out` (default `ca_dir(out)`), which must not be `out` or inside it."""
    if not server_names:
        raise ConfigError("--server-name is empty: give the host name(s) or IP address(es) hospitals connect to")
    certs = ServerCerts.in_dir(out, ca_out)
    if certs.ca_key.parent.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"the CA key's folder {certs.ca_key.parent} is inside {out}, which the server reads: "
                          "choose a folder outside it")
    _refuse_overwrite(certs.ca_key, certs.key)
    out.mkdir(parents=True, exist_ok=True)
    certs.ca_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhosp consortium"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedhosp consortium CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])])
    cert = (
        _builder(name, ca_name, key.public_key(), SERVER_DAYS)
        .add_extension(x509.SubjectAlternativeName(_alt_names([*server_names, *LOOPBACK_NAMES])), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(certs.ca_key, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    _write_private(certs.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certs


def site(name: str, out: Path) -> SiteKeys:
    """Create hospital `name`'s SuperNode key pair in its own folder `out`."""
    check_site_name(name)
    keys = SiteKeys(out / f"{name}.key", out / f"{name}.pub")
    _refuse_overwrite(keys.private, keys.public)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    _write_private(keys.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.public.write_bytes(public + f" {name}\n".encode())
    return keys


def check_site_name(name: str) -> None:
    if not SITE_NAME.match(name):
        raise ConfigError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 63, no leading symbol)")


def server_names(text: str) -> list[str]:
    """`"fl.example.org,10.0.0.5"` -> ["fl.example.org", "10.0.0.5"]."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + datetime.timedelta(days=days)))


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    seen: list[x509.GeneralName] = []
    for name in names:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
                raise ConfigError(f"--server-name {name!r} is neither a host name nor an IP address") from None
            entry = x509.DNSName(name.lower())
        if entry not in seen:
            seen.append(entry)
    return seen


def _refuse_overwrite(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise ConfigError(f"{path} exists: refusing to overwrite a key; choose another --out or remove it first")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)

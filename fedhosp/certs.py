"""The provisioning kit: a consortium CA, the coordinator's TLS certificate, each hospital's key pair.

TLS needs a CA the hospitals trust and a server certificate whose subject alternative
names match every address hospitals dial (a mismatch fails the handshake). SuperNode
authentication needs one EC key pair per hospital in OpenSSH format, which is what
Flower 1.41 reads (`flwr supernode register` takes the public key, `flower-supernode
--auth-supernode-private-key` the private one). A hospital makes its pair on its own
machine and sends only the `.pub`: the private key never leaves the site's folder.
Private keys are created 0600 and never overwritten.

Mutual TLS at the hospitals' address (fedhosp/fleet_proxy.py) needs one more thing per
hospital: a client certificate signed by the consortium CA. The same key pair serves: `site`
also writes a certificate signing request (`NAME.csr`, public) that the hospital sends with its
`.pub`; `sign` (at the coordinator, with the offline CA folder) turns it into `NAME.crt`
(clientAuth only) that the hospital keeps beside its key. So the certificate that opens the
TLS connection and the key that signs every Fleet API call are one identity.

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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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
CA_DAYS, SERVER_DAYS, SITE_DAYS = 3650, 825, 825
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
    request: Path  # NAME.csr: for `fedhosp certs sign` at the coordinator

    @property
    def certificate(self) -> Path:
        """Where the signed NAME.crt goes: beside the key (what `fedhosp client --cert` defaults to)."""
        return site_certificate(self.private)


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
    (certs.ca_key.parent / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))  # for `sign`
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certs


def site(name: str, out: Path) -> SiteKeys:
    """Create hospital `name`'s key pair in its own folder `out`: the SuperNode's key, its `.pub` and a CSR
    for the client certificate, all of the one key."""
    check_site_name(name)
    keys = SiteKeys(out / f"{name}.key", out / f"{name}.pub", out / f"{name}.csr")
    _refuse_overwrite(keys.private, keys.public, keys.request)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    _write_private(keys.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.public.write_bytes(public + f" {name}\n".encode())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA384()))
    keys.request.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return keys


def site_certificate(key: Path) -> Path:
    """A site's client certificate by default: NAME.crt beside NAME.key."""
    return key.with_suffix(".crt")


def sign(request_path: Path, ca_folder: Path, out: Path) -> Path:
    """At the coordinator: sign a hospital's NAME.csr with the CA in `ca_folder` (ca.key, and ca.crt beside it
    or in the certificate folder it belongs to); write `out`/NAME.crt, good for TLS client authentication only."""
    try:
        request = x509.load_pem_x509_csr(request_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{request_path}: {exc.strerror}; pass the NAME.csr the hospital sent") from None
    except ValueError:
        raise ConfigError(f"{request_path}: not a PEM certificate signing request (`fedhosp certs site` writes "
                          "NAME.csr)") from None
    try:
        valid = request.is_signature_valid
        key = request.public_key()
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise ConfigError(f"{request_path}: its signature does not match its key; ask the hospital for a new one")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if len(names) == 1 else ""
    check_site_name(name)
    if request_path.stem != name:
        raise ConfigError(f"{request_path} asks for a certificate named {name!r}: rename it {name}.csr if that is "
                          "the site you mean to admit")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise ConfigError(f"{request_path}: not a {CURVE.name} key; the hospital makes its pair with "
                          "`fedhosp certs site`")
    ca_cert, ca_key = _load_ca(ca_folder)
    target = out / f"{name}.crt"
    _refuse_overwrite(target)
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_cert.subject, key, SITE_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    target.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return target


def check_site_certificate(cert_path: Path, key_path: Path, ca_path: Path) -> x509.Certificate:
    """The site's client certificate is its key's, issued by the consortium CA, valid now, for client
    authentication: whatever is wrong is said here, in one line, instead of as a refused handshake later."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError:
        raise ConfigError(f"--cert {cert_path}: no such file; send {key_path.with_suffix('.csr').name} to the "
                          "coordinator, who signs it with `fedhosp certs sign`, and put the NAME.crt you get back "
                          "beside the key") from None
    except ValueError:
        raise ConfigError(f"--cert {cert_path}: not a PEM certificate") from None
    if _public_bytes(cert.public_key()) != _public_bytes(load_site_key(key_path).public_key()):
        raise ConfigError(f"--cert {cert_path} was not issued for --key {key_path}: it holds another public key")
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"--cert {cert_path} is not signed by the consortium CA in --ca {ca_path}") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(f"--cert {cert_path} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}, not now: ask the coordinator to sign a new one")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ConfigError(f"--cert {cert_path} is not a client certificate (no clientAuth usage): "
                          "`fedhosp certs sign` makes one")
    return cert


def load_site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's NAME.key (OpenSSH format, as Flower reads it)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--key {path}: not a site key from `fedhosp certs site` ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--key {path}: not an EC key; make one with `fedhosp certs site`")
    return key


def pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    """`key` as PEM PKCS#8, the form Python's ssl module loads."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_ca(ca_folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """ca.key from `ca_folder`; ca.crt from there too, or (folders `init` wrote before it copied it there)
    from the certificate folder `ca_folder` belongs to (`certs-ca/` -> `certs/`)."""
    key_path = ca_folder / CA_KEY
    if not key_path.is_file():
        raise ConfigError(f"--ca-dir {ca_folder}: no {CA_KEY}; pass the CA folder `fedhosp certs init` wrote "
                          f"(OUT{CA_DIR_SUFFIX}/)")
    candidates = [ca_folder / CA_CERT]
    if ca_folder.name.endswith(CA_DIR_SUFFIX):
        candidates.append(ca_folder.with_name(ca_folder.name[:-len(CA_DIR_SUFFIX)]) / CA_CERT)
    cert_path = next((p for p in candidates if p.is_file()), None)
    if cert_path is None:
        raise ConfigError(f"--ca-dir {ca_folder}: no {CA_CERT} beside {CA_KEY}; copy the consortium's ca.crt there")
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or _public_bytes(ca_key.public_key()) != \
            _public_bytes(ca_cert.public_key()):
        raise ConfigError(f"{cert_path} is not the certificate of {key_path}")
    return ca_cert, ca_key


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

"""The site's tunnel: the SuperNode's connection to the coordinator, with the site's client certificate.

The coordinator's hospitals' address requires a client certificate signed by the consortium
CA (mutual TLS at nginx, fedhosp/fleet_proxy.py), and Flower 1.41's `flower-supernode` cannot
present one: its only TLS flag is `--root-certificates`, and its HTTP client's SSLContext gets
CA locations only (flwr/supercore/protobuf/client.py `from_server_address`). It cannot go without
TLS either: `--insecure` with `--auth-supernode-private-key` is refused at start
(flwr/supernode/start_client_internal.py; node auth needs TLS), and `--insecure` with
`--root-certificates` too (flwr/common/args.py). So `fedhosp client` starts this forwarder beside
the SuperNode, and the SuperNode dials it instead of the coordinator:

    SuperNode --TLS (loopback certificate)--> tunnel, 127.0.0.1 --mutual TLS (NAME.crt)--> nginx

The tunnel listens on 127.0.0.1 only, with a certificate made for this start (`loopback_pair`:
the SuperNode gets it as `--root-certificates`, so it trusts this tunnel and nothing else), and
for each connection opens a TLS connection to the coordinator with the site's certificate and key,
verifying the coordinator against the consortium CA and its server name. Bytes pass through
unchanged (HTTP/1.1: Flower's httpx client offers no HTTP/2), so SuperNode authentication, the
signature Flower puts in each request's headers, still proves the hospital to Flower; the
certificate is the transport gate in front of it. Nothing here touches Flower, so it works the
same whether Flower's workarounds (common/flower_compat) are on or off. The site's key is read
from NAME.key (OpenSSH format, Flower's) and handed to OpenSSL through an anonymous memory file:
no second copy of it lands on disk.

Usage (as `fedhosp client` prints it): python -m fedhosp.site_tunnel --listen 127.0.0.1:PORT
    --loopback-cert C --loopback-key K --server HOST:PORT --ca ca.crt --cert NAME.crt --key NAME.key
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, FedhospError
from fedhosp import certs

LOOPBACK = "127.0.0.1"
LOOPBACK_CERT, LOOPBACK_KEY = "tunnel.crt", "tunnel.key"
PREFIX = "fedhosp site tunnel: "  # every line the tunnel prints starts so (the site's log, the console)
CHUNK = 1 << 16
HANDSHAKE_TIMEOUT_S = 15.0
EXIT_CONFIG = 2
# What a TLS server sends when it will not take our certificate (OpenSSL's reason names).
REFUSAL_ALERTS = ("ALERT_HANDSHAKE_FAILURE", "ALERT_CERTIFICATE_REQUIRED", "ALERT_BAD_CERTIFICATE",
                  "ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED",
                  "ALERT_CERTIFICATE_UNKNOWN", "ALERT_ACCESS_DENIED", "ALERT_DECRYPT_ERROR",
                  "ALERT_UNSUPPORTED_CERTIFICATE")
# nginx's own answer when a certificate arrived but did not verify (its handshake lets the chain through).
NGINX_CERT_ERROR = b"The SSL certificate error"


class Refused(FedhospError):
    """The coordinator turned this site's certificate away."""


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Upstream:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--server {text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS to the coordinator: the consortium CA only, the server's name checked, the site's certificate shown."""
    certs.check_site_certificate(cert, key, ca)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, certs.pkcs8(certs.load_site_key(key)))
    return context


def loopback_pair(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made for one start of the site: the SuperNode trusts it alone.
    The key is 0600 in `folder` (the site's private per-start folder) and dies with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhosp site tunnel")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / LOOPBACK_CERT, folder / LOOPBACK_KEY
    folder.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(certs.pkcs8(key))
    return cert_path, key_path


def command(listen_port: int, loopback: tuple[Path, Path], server: str, ca: Path, cert: Path,
            key: Path, source: str | None = None) -> list[str]:
    """`source`: the local address to dial the coordinator from (default: the system's choice)."""
    return [sys.executable, "-m", "fedhosp.site_tunnel", "--listen", f"{LOOPBACK}:{listen_port}",
            "--loopback-cert", str(loopback[0]), "--loopback-key", str(loopback[1]), "--server", server,
            "--ca", str(ca.resolve()), "--cert", str(cert.resolve()), "--key", str(key.resolve()),
            *(["--source", source] if source else [])]


def refusal(exc: ssl.SSLError) -> bool:
    """Whether `exc` is the peer refusing our certificate (a TLS alert), not a network failure."""
    return any(alert in str(exc.reason or exc) for alert in REFUSAL_ALERTS)


def probe(upstream: Upstream, context: ssl.SSLContext, cert: Path, timeout: float = 10.0,
          source: str | None = None) -> bool:
    """One handshake and one request to the coordinator with the site's certificate: True if it took them,
    False if it does not answer (yet); Refused (one line: why) if it turned the certificate away."""
    request = f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((upstream.host, upstream.port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as raw, \
                context.wrap_socket(raw, server_hostname=upstream.host) as tls:
            tls.sendall(request)  # TLS 1.3: a refused certificate is only heard of on the first read
            answer = tls.recv(4096)
    except ssl.SSLCertVerificationError:
        raise
    except ssl.SSLError as exc:
        if refusal(exc):
            raise Refused(refused_message(upstream, cert, exc.reason or str(exc))) from None
        raise
    except OSError:
        return False
    if NGINX_CERT_ERROR in answer:
        raise Refused(refused_message(upstream, cert, "its nginx answered: The SSL certificate error"))
    return bool(answer)


def refused_message(upstream: Upstream, cert: Path, reason: str) -> str:
    return (f"TLS: the coordinator at {upstream} refused this site's client certificate {cert.name} ({reason}): "
            f"ask the coordinator to sign {cert.with_suffix('.csr').name} with `fedhosp certs sign` and use the "
            "NAME.crt it sends back")


def _load_chain(context: ssl.SSLContext, cert: Path, key_pem: bytes) -> None:
    """`load_cert_chain` reads files only: give it the key through an anonymous memory file."""
    fd = os.memfd_create("fedhosp-site-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem)
        context.load_cert_chain(str(cert), f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class Tunnel:
    """The forwarder: each loopback TLS connection becomes one mutual-TLS connection to the coordinator."""

    def __init__(self, upstream: Upstream, client: ssl.SSLContext, cert: Path, source: str | None = None) -> None:
        self.upstream, self.client, self.cert, self.source = upstream, client, cert, source
        self._said = ""

    def say(self, text: str) -> None:
        """One line per new state, not per connection: the SuperNode retries often."""
        if text != self._said:
            self._said = text
            print(PREFIX + text, flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                self.upstream.host, self.upstream.port, ssl=self.client, server_hostname=self.upstream.host,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S, local_addr=(self.source, 0) if self.source else None),
                HANDSHAKE_TIMEOUT_S + 5)
        except ssl.SSLError as exc:
            self._failed(exc)
            writer.close()
            return
        except (TimeoutError, OSError) as exc:
            self.say(f"cannot reach the coordinator at {self.upstream} ({exc.__class__.__name__}: {exc}); "
                     "the SuperNode keeps trying")
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, upstream=True))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool = False) -> None:
        try:
            while data := await reader.read(CHUNK):
                if upstream:  # the coordinator answered: it took the certificate
                    self.say(f"connected to the coordinator at {self.upstream} with {self.cert.name}")
                writer.write(data)
                await writer.drain()
        except ssl.SSLError as exc:
            if upstream:
                self._failed(exc)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _failed(self, exc: ssl.SSLError) -> None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            self.say(f"TLS: the coordinator at {self.upstream} is not trusted with --ca ({exc.verify_message})")
        elif refusal(exc):
            self.say(refused_message(self.upstream, self.cert, exc.reason or str(exc)))
        else:
            self.say(f"TLS with the coordinator at {self.upstream} failed ({exc.reason or exc})")


async def serve(listen_port: int, loopback: ssl.SSLContext, tunnel: Tunnel) -> None:
    server = await asyncio.start_server(tunnel.handle, LOOPBACK, listen_port, ssl=loopback,
                                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
    print(f"{PREFIX}{LOOPBACK}:{listen_port} -> {tunnel.upstream} (client certificate {tunnel.cert.name})",
          flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="127.0.0.1:PORT")
    parser.add_argument("--loopback-cert", type=Path, required=True)
    parser.add_argument("--loopback-key", type=Path, required=True)
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--source", default=None, metavar="ADDRESS", help="the local address to dial from")
    args = parser.parse_args(argv)
    try:
        host, _, port = args.listen.rpartition(":")
        if host != LOOPBACK or not port.isdigit():
            raise ConfigError(f"--listen {args.listen!r}: the tunnel listens on {LOOPBACK}:PORT only")
        client = client_context(args.ca, args.cert, args.key)
        loopback = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        loopback.load_cert_chain(str(args.loopback_cert), str(args.loopback_key))
        tunnel = Tunnel(Upstream.parse(args.server), client, args.cert, args.source)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(int(port), loopback, tunnel))
    except OSError as exc:  # the port is taken
        print(f"{PREFIX}cannot listen on {args.listen} ({exc.strerror}): pass another --tunnel-port", file=sys.stderr,
              flush=True)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

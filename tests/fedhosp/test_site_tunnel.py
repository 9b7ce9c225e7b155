"""The site tunnel against a stand-in coordinator that requires client certificates (stdlib TLS server).

What the SuperNode does through it is what Flower's HTTP client does: httpx over TLS, trusting only
the loopback certificate the tunnel got for this start. The upstream must see the site's certificate
(CN = the site's name) and the request bytes unchanged; a coordinator that refuses the certificate
is reported by the tunnel in one line.
"""

import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedhosp import certs, processes, site_tunnel
from tests.fedhosp import provision

ROOT = Path(__file__).resolve().parents[2]


class Upstream:
    """A one-thread HTTPS server requiring a client certificate from `ca`; answers with the client's CN
    and the request it got."""

    def __init__(self, made: certs.ServerCerts, ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(made.cert, made.key)
        self.context.load_verify_locations(ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[tuple[str, bytes]] = []
        self.peers: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
                self.peers.append(peer[0])
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    subject = dict(x[0] for x in tls.getpeercert()["subject"])
                    request = b""
                    while b"\r\n\r\n" not in request:
                        request += tls.recv(65536)
                    head, _, body = request.partition(b"\r\n\r\n")
                    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length")), b"0"))
                    while len(body) < length:
                        body += tls.recv(65536)
                    self.seen.append((subject["commonName"], body))
                    answer = f"site {subject['commonName']}".encode()
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                % (len(answer), answer))
            except (ssl.SSLError, OSError):
                pass


@pytest.fixture
def world(tmp_path):
    made = certs.init(tmp_path / "certs", ["localhost"])
    keys = provision.site("hosp-a", tmp_path / "hosp-a", tmp_path / "certs")
    return tmp_path, made, keys


def _tunnel(tmp_path, made, keys, upstream_port, cert=None, source=None):
    port = processes.free_port()
    loopback = site_tunnel.loopback_pair(tmp_path / "start")
    cmd = site_tunnel.command(port, loopback, f"localhost:{upstream_port}", made.ca_cert, cert or keys.certificate,
                              keys.private, source)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, port, loopback


def test_the_supernodes_calls_reach_the_coordinator_with_the_sites_certificate(world):
    tmp_path, made, keys = world
    upstream = Upstream(made, made.ca_cert)
    proc, port, loopback = _tunnel(tmp_path, made, keys, upstream.port, source="127.0.0.7")
    try:
        body = bytes(range(256)) * 4096  # 1 MiB, every byte value: passed through unchanged
        answer = httpx.post(f"https://127.0.0.1:{port}/v1/fleet/push-object", content=body,
                            verify=ssl.create_default_context(cafile=str(loopback[0])), timeout=30)
        assert answer.status_code == 200 and answer.text == "site hosp-a"
        assert upstream.seen == [("hosp-a", body)] and upstream.peers == ["127.0.0.7"]  # --source-address
        # the SuperNode trusts this start's loopback certificate, nothing else: not the consortium's
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/", verify=ssl.create_default_context(cafile=str(made.ca_cert)))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert f"127.0.0.1:{port} -> localhost:{upstream.port} (client certificate hosp-a.crt)" in out
    assert sum(line.startswith(site_tunnel.PREFIX) for line in out.splitlines()) == 2  # started, connected


def test_a_coordinator_that_refuses_the_certificate_is_reported_in_one_line(world):
    tmp_path, made, keys = world
    other = certs.init(tmp_path / "other", ["localhost"])
    upstream = Upstream(made, other.ca_cert)  # trusts client certificates of another CA only
    proc, port, loopback = _tunnel(tmp_path, made, keys, upstream.port)
    try:
        for _ in range(3):  # the SuperNode retries: the reason is said once
            with pytest.raises(httpx.HTTPError):
                httpx.post(f"https://127.0.0.1:{port}/v1/fleet/get-run", content=b"x",
                           verify=ssl.create_default_context(cafile=str(loopback[0])), timeout=30)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    refused = [line for line in out.splitlines() if "refused this site's client certificate hosp-a.crt" in line]
    assert len(refused) == 1 and "ALERT" in refused[0] and "fedhosp certs sign" in refused[0], out
    assert not upstream.seen


def test_a_certificate_that_is_not_the_sites_stops_the_tunnel_at_start(world):
    tmp_path, made, keys = world
    other = provision.site("hosp-b", tmp_path / "hosp-b", tmp_path / "certs")
    proc, _, _ = _tunnel(tmp_path, made, keys, 1, cert=other.certificate)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == site_tunnel.EXIT_CONFIG
    assert out.strip().splitlines() == [f"{site_tunnel.PREFIX}--cert {other.certificate} was not issued for --key "
                                        f"{keys.private}: it holds another public key"]
    done = subprocess.run([sys.executable, "-m", "fedhosp.site_tunnel", "--listen", "0.0.0.0:9095", "--loopback-cert",
                           "x", "--loopback-key", "x", "--server", "h:1", "--ca", "x", "--cert", "x", "--key", "x"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == site_tunnel.EXIT_CONFIG and "listens on 127.0.0.1:PORT only" in done.stderr

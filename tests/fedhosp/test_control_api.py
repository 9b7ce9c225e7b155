"""What the hospitals' address exposes, on a real SuperLink + nginx (loopback only).

The Control API (start/stop runs, register nodes) has no authentication in Flower 1.41's
open-source build and shares the SuperLink's port with the Fleet API; `fedhosp server`
binds the SuperLink to 127.0.0.1 and puts nginx, forwarding /v1/fleet/* only, on the
hospitals' address. These tests send Control API calls to that address (all refused),
check the SuperLink listens on loopback only, and that the Fleet API does get through.
Hospitals without the CA, in plaintext, or with an unregistered key are turned away; so is a
request body larger than the run's model, by nginx; and a site whose key left --sites, at restart.
Only certificate holders reach Flower at all (mutual TLS at nginx): a client without a certificate
from the consortium CA fails the TLS handshake, and one with another CA's is answered by nginx.
"""

import contextlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common import flower_env
from common.errors import ConfigError
from fedhosp import certs, coordinator, fleet_proxy, processes, site_tunnel
from tests.fedhosp import provision
from tests.flower_probes import (
    PROTOBUF_MEDIA_TYPE,
    PROTOBUF_REQUEST_TYPES,
    ListNodesRequest,
    RegisterNodeRequest,
    try_load_public_key,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HEADERS = {"content-type": PROTOBUF_MEDIA_TYPE}


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    base = tmp_path_factory.mktemp("coordinator")
    made = certs.init(base / "certs", ["fl.example.org"])
    (base / "sites").mkdir()
    provision.site("hosp-a", base / "hosp-a", base / "certs")
    (base / "sites" / "hosp-a.pub").write_bytes((base / "hosp-a" / "hosp-a.pub").read_bytes())
    provision.site("rogue", base / "rogue", base / "certs")  # a certificate, but a key not in --sites
    certs.init(base / "other", ["fl.example.org"])  # another CA, named like ours
    provision.site("stranger", base / "stranger", base / "other")
    fleet_port, control_port = processes.free_port(), processes.free_port()
    opts = coordinator.ServerOptions(certs=base / "certs", sites=base / "sites", rounds=1, out=base / "out",
                                     app=ROOT, listen=f"127.0.0.1:{fleet_port}", control_port=control_port)
    with coordinator.coordinator_up(opts) as (children, env):
        yield {"base": base, "ca": made.ca_cert, "fleet": fleet_port, "control": control_port, "env": env,
               "children": children, "opts": opts}
    assert not any(c.alive() for c in children)


def _context(ca, site="hosp-a", base=None):
    """TLS trusting `ca`, showing `site`'s client certificate (None: no certificate)."""
    context = ssl.create_default_context(cafile=str(ca))
    if site is not None:
        folder = (base or Path(ca).parents[1]) / site
        context.load_cert_chain(folder / f"{site}.crt", _pem_key(folder / f"{site}.key"))
    return context


def _pem_key(key):
    """The site's OpenSSH key as PEM beside it (Python's ssl reads files only; tests may leave a copy)."""
    pem = key.with_suffix(".pem")
    if not pem.exists():
        pem.write_bytes(certs.pkcs8(certs.load_site_key(key)))
    return pem


def _post(port, path, ca, body=b"", site="hosp-a"):
    return httpx.post(f"https://127.0.0.1:{port}{path}", content=body, headers=HEADERS, verify=_context(ca, site),
                      timeout=20)


def test_the_hospitals_address_refuses_every_control_and_runtime_call(link):
    routes = [path for (method, path) in PROTOBUF_REQUEST_TYPES if not path.startswith("/v1/fleet/")]
    assert any(p.startswith("/v1/control/") for p in routes) and any(p.startswith("/v1/runtime/") for p in routes)
    for path in [*routes, "/docs", "/openapi.json", "/health", "/v1/fleet/../control/list-nodes",
                 "/v1/fleet/%2e%2e/control/list-nodes", "/v1/fleet/..%2fcontrol/list-nodes", "//v1/control/list-nodes"]:
        response = _post(link["fleet"], path, link["ca"], ListNodesRequest().SerializeToString())
        assert response.status_code == 404, (path, response.status_code, response.text[:200])
    # the same Control API call, on the coordinator's loopback port, is answered: the refusal above is the proxy's
    direct = _post(link["control"], "/v1/control/list-nodes", link["ca"], ListNodesRequest().SerializeToString())
    assert direct.status_code == 200


def test_registering_a_node_through_the_hospitals_address_fails(link):
    rogue_pub = link["base"] / "rogue" / "rogue.pub"
    request = RegisterNodeRequest(public_key=try_load_public_key(rogue_pub), name="rogue")
    assert _post(link["fleet"], "/v1/control/register-node", link["ca"], request.SerializeToString()).status_code == 404
    # Flower's own CLI, pointed at the hospitals' address, cannot list or register nodes either
    home = link["base"] / "attacker-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{link["fleet"]}"\n'
        f'root-certificates = "{link["ca"]}"\n')
    env = flower_env.command_env(home)
    done = subprocess.run(["flwr", "supernode", "register", str(rogue_pub), "x"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    listed = subprocess.run(["flwr", "supernode", "ls", "--format", "json"], env=link["env"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.count('"node-id"') == 1  # only hosp-a is registered


def test_the_fleet_api_gets_through_and_the_superlink_listens_on_loopback_only(link):
    response = _post(link["fleet"], "/v1/fleet/get-run", link["ca"])
    assert response.status_code == 401 and "SuperNode authentication" in response.text  # reached the SuperLink
    sockets = _listening(link["control"])
    assert sockets and all(address == "127.0.0.1" for address in sockets), sockets


GET_RUN = (f"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\ncontent-type: {PROTOBUF_MEDIA_TYPE}\r\n"
           "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()


def _exchange(link, context, request=GET_RUN):
    """A handshake and one request: ("handshake", the TLS error) if TLS failed, else ("http", the answer)."""
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)  # TLS 1.3: a client certificate refused is heard of on the first read
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        except ssl.SSLError as exc:
            return "handshake", exc.reason
    return "http", answer


def _access_log(link):
    return (link["opts"].work / "nginx-access.log").read_text().splitlines()


def _logged(link, before, text, timeout=15.0):
    """The access-log lines after the first `before` that hold `text`: nginx writes a request's line once it
    has finished with the connection (after its lingering close), so wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in _access_log(link)[before:] if text in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_without_a_client_certificate_the_tls_handshake_fails(link, version):
    context = _context(link["ca"], site=None)
    context.maximum_version = version
    before = len(_access_log(link))
    kind, reason = _exchange(link, context)
    # no HTTP at all: the alert TLS 1.3 has for it, or TLS 1.2's generic one
    assert kind == "handshake" and reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE")
    assert not [line for line in _access_log(link)[before:] if ' "-" "' in line]  # no request without a certificate
    assert "peer did not return a certificate" in (link["opts"].work / "nginx-error.log").read_text()
    # curl, as an operator would try it
    done = subprocess.run(["curl", "-sS", "--cacert", str(link["ca"]), "--resolve",
                           f"localhost:{link['fleet']}:127.0.0.1", "-X", "POST",
                           f"https://localhost:{link['fleet']}/v1/fleet/get-run"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode in (35, 56) and re.search("alert (certificate required|handshake failure)", done.stderr), \
        (done.returncode, done.stderr)
    # the same request with hosp-a's certificate reaches Flower (which wants node auth)
    kind, answer = _exchange(link, _context(link["ca"]))
    assert kind == "http" and answer.startswith(b"HTTP/1.1 401") and b"SuperNode authentication" in answer


def test_a_certificate_from_another_ca_never_reaches_flower(link):
    """nginx's handshake lets a chain that does not verify through and refuses it at once, before proxying
    (its verify callback accepts every chain, for `optional_no_ca`): a 400 of its own, upstream never asked."""
    before = len(_access_log(link))
    kind, answer = _exchange(link, _context(link["ca"], "stranger"))
    assert kind == "http" and answer.startswith(b"HTTP/1.1 400") and b"The SSL certificate error" in answer
    line, = _logged(link, before, "get-run")
    assert '"CN=stranger"' in line and " 400 " in line and line.endswith("upstream=-"), line
    with pytest.raises(site_tunnel.Refused, match=r"refused this site's client certificate stranger\.crt"):
        site_tunnel.probe(site_tunnel.Upstream("localhost", link["fleet"]), _context(link["ca"], "stranger"),
                          link["base"] / "stranger" / "stranger.crt")
    with pytest.raises(site_tunnel.Refused, match="ALERT_"):  # what the tunnel would say without one
        site_tunnel.probe(site_tunnel.Upstream("localhost", link["fleet"]), _context(link["ca"], None),
                          link["base"] / "hosp-a" / "hosp-a.crt")
    assert site_tunnel.probe(site_tunnel.Upstream("localhost", link["fleet"]), _context(link["ca"]),
                             link["base"] / "hosp-a" / "hosp-a.crt")


def test_a_1_gib_post_with_a_valid_certificate_is_refused_413_before_flower_sees_it(link):
    gib = 1 << 30
    head = (f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\ncontent-type: {PROTOBUF_MEDIA_TYPE}\r\n"
            f"Content-Length: {gib}\r\n\r\n").encode()
    chunk = bytes(1 << 20)  # the same MiB, sent again and again: nothing like 1 GiB is ever allocated
    before = len(_access_log(link))
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw, \
            _context(link["ca"]).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(head)
        tls.setblocking(False)
        try:
            while sent < gib and not answer:
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer = tls.recv(4096)
                try:
                    sent += tls.send(chunk)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    time.sleep(0.01)
        except (ConnectionError, ssl.SSLError):  # nginx answered and closed: the rest is refused unread
            pass
        tls.setblocking(True)
        tls.settimeout(20)
        while not answer.count(b"\r\n\r\n"):
            try:
                more = tls.recv(4096)
            except (ConnectionError, ssl.SSLError):
                break
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < gib // 8, sent  # refused on its Content-Length, long before the body was through
    line, = _logged(link, before, "push-object")
    assert '"CN=hosp-a"' in line and " 413 " in line and line.endswith("upstream=-"), line  # never proxied


def test_a_plaintext_or_ca_less_supernode_is_refused(link, tmp_path):
    key = ["--auth-supernode-private-key", str(link["base"] / "hosp-a" / "hosp-a.key")]  # a registered key
    # plaintext (Flower itself refuses node auth without TLS, so this one comes without a key);
    # then TLS trusting only the system CAs, with the registered key
    for args in (["--insecure"], key):
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{link['fleet']}", *args, "--max-retries", "1",
               "--port", str(processes.free_port())]
        code, output = _contained(cmd, flower_env.command_env(tmp_path / "home"))
        assert code != 0, args
        assert "Exit Code: 305" in output, args  # Flower: could not connect to the SuperLink
    listed = subprocess.run(["flwr", "supernode", "ls", "--format", "json"], env=link["env"], capture_output=True,
                            text=True, timeout=120)
    assert '"online"' not in listed.stdout  # neither ever became an online node


def test_fedhosp_client_says_why_it_was_refused(link, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    wrong = certs.init(tmp_path / "other-ca", ["fl.example.org"])
    common = [sys.executable, "-m", "fedhosp.cli", "client", "--server", f"127.0.0.1:{link['fleet']}",
              "--data", str(data), "--max-wait", "20", "--runtime-port", str(processes.free_port())]
    (link["base"] / "unsigned").mkdir()
    certs.site("unsigned", link["base"] / "unsigned")  # made its request, never got it signed
    cases = [(wrong.ca_cert, "hosp-a", "is not signed by the consortium CA in --ca"),
             (link["ca"], "stranger", "is not signed by the consortium CA in --ca"),
             (link["ca"], "unsigned", "`fedhosp certs sign`"),
             (link["ca"], "rogue", "refused this site's key (rogue.key): it is not registered")]
    for ca, site, message in cases:
        key = link["base"] / site / f"{site}.key"
        done = subprocess.run([*common, "--ca", str(ca), "--key", str(key)], capture_output=True, text=True,
                              timeout=180, cwd=ROOT)
        assert done.returncode == 2, done.stderr[-2000:]
        assert any(message in line for line in done.stderr.splitlines()), done.stderr[-2000:]  # in one line


def test_a_body_larger_than_the_runs_model_is_refused_by_nginx(link):
    limit = fleet_proxy.run_body_bytes(coordinator.run_config(link["opts"]))
    assert limit >= 2 * 4 * 100_000  # sized from the model: the default CNN alone has more than 100k weights
    over = _post(link["fleet"], "/v1/fleet/push-messages", link["ca"], b"\0" * (limit + 1))
    assert over.status_code == 413 and "Request Entity Too Large" in over.text  # nginx's page, not Flower's
    at = _post(link["fleet"], "/v1/fleet/push-messages", link["ca"], b"\0" * limit)
    assert at.status_code == 400 and "nginx" not in at.text, at.text[:300]  # the SuperLink's: not protobuf
    # a client that only claims a 1 GiB body is answered 413 at once, before sending any of it
    head = (f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: {PROTOBUF_MEDIA_TYPE}\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw, \
            _context(link["ca"]).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(head.encode())
        assert tls.recv(64).startswith(b"HTTP/1.1 413")


def test_a_client_that_sends_its_headers_slowly_is_cut_off(link):
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw, \
            _context(link["ca"]).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\n")  # and never the rest
        started = time.monotonic()
        tls.settimeout(fleet_proxy.HEADER_TIMEOUT_S + 15)
        try:
            answer = tls.recv(64)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        waited = time.monotonic() - started
    assert answer == b"" and waited < fleet_proxy.HEADER_TIMEOUT_S + 5, (answer, waited)  # closed, unanswered


def test_the_proxy_config_limits_each_client_address(link):
    text = (link["opts"].work / fleet_proxy.CONFIG).read_text()
    limit = fleet_proxy.run_body_bytes(coordinator.run_config(link["opts"]))
    assert f"client_max_body_size {limit // fleet_proxy.MIB}m;" in text
    for directive in ("limit_conn per_address ", "limit_req zone=fleet_rate ", "limit_req_zone $binary_remote_addr ",
                      "client_header_timeout 10s;", "client_body_timeout 30s;", "proxy_read_timeout 60s;"):
        assert directive in text, directive
    assert "client_max_body_size 0" not in text and "3600s" not in text


def test_admit_unregisters_every_node_whose_key_left_the_sites(tmp_path, monkeypatch):
    """The reconcile step against a fake `flwr` CLI: registers, keeps, revokes, and refuses a revoked key."""
    keys = {n: certs.site(n, tmp_path / n).public for n in ("hosp-a", "hosp-b")}
    record = tmp_path / "registered.json"
    record.write_text(json.dumps({"7": {"name": "hosp-a", "key": coordinator.key_fingerprint(keys["hosp-a"])},
                                  "8": {"name": "gone", "key": "f" * 64}}))
    listing = {"7": "online", "8": "offline", "9": "registered", "5": "unregistered"}
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[1:4])
        if cmd[2] == "ls":
            nodes = [{"node-id": n, "status": s} for n, s in listing.items()]
            return subprocess.CompletedProcess(cmd, 0, json.dumps({"success": True, "nodes": nodes}), "")
        if cmd[2] == "register" and cmd[3] == str(keys["hosp-a"]):
            return subprocess.CompletedProcess(cmd, 1, '{"success": false, "error-message": "Public key already '
                                               'in use"}', "")
        if cmd[2] == "register":
            return subprocess.CompletedProcess(cmd, 0, '{"success": true, "node-id": 11}', "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(coordinator.subprocess, "run", fake_run)
    coordinator.admit(keys, record, {})
    assert [c[2] for c in calls if c[1] == "unregister"] == ["8", "9"]  # hosp-a (7) and hosp-b (11) stay
    assert json.loads(record.read_text())["11"]["name"] == "hosp-b"
    listing["7"] = "unregistered"  # hosp-a's key was revoked earlier: Flower never takes it back
    with pytest.raises(ConfigError, match="was revoked"):
        coordinator.admit(keys, record, {})
    assert coordinator.to_unregister({"1": "online", "2": "unregistered", "3": "offline"}, {"3"}) == ["1"]


def test_removing_a_sites_key_and_restarting_locks_it_out(tmp_path):
    certs.init(tmp_path / "certs", ["fl.example.org"])
    (tmp_path / "sites").mkdir()
    for name in ("hosp-a", "hosp-b"):
        provision.site(name, tmp_path / name, tmp_path / "certs")
        shutil.copy(tmp_path / name / f"{name}.pub", tmp_path / "sites")
    fleet = processes.free_port()
    opts = coordinator.ServerOptions(certs=tmp_path / "certs", sites=tmp_path / "sites", rounds=1, out=tmp_path / "out",
                                     app=ROOT, listen=f"127.0.0.1:{fleet}", control_port=processes.free_port())
    with coordinator.coordinator_up(opts) as (_, env):
        first = coordinator.list_nodes(env)
    assert len(first) == 2 and coordinator.UNREGISTERED not in first.values()
    (tmp_path / "sites" / "hosp-b.pub").unlink()
    with coordinator.coordinator_up(opts) as (_, env):
        after = coordinator.list_nodes(env)
        ids = {e["name"]: n for n, e in json.loads((opts.work / coordinator.REGISTERED).read_text()).items()}
        assert after == {**first, ids["hosp-b"]: coordinator.UNREGISTERED}  # hosp-a untouched
        done = _client(fleet, tmp_path / "certs" / "ca.crt", tmp_path / "hosp-b" / "hosp-b.key", tmp_path)
        assert done.returncode == 2 and "is not registered" in done.stderr, done.stderr[-2000:]
    shutil.copy(tmp_path / "hosp-b" / "hosp-b.pub", tmp_path / "sites")  # putting the old key back is no way in
    with pytest.raises(ConfigError, match="was revoked"), coordinator.coordinator_up(opts):
        pass


def _client(fleet_port, ca, key, tmp_path):
    data = tmp_path / "client-data"
    data.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "fedhosp.cli", "client", "--server", f"127.0.0.1:{fleet_port}", "--data", str(data),
           "--max-wait", "20", "--runtime-port", str(processes.free_port()), "--ca", str(ca), "--key", str(key)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)


def _contained(cmd, env):
    done = subprocess.run([sys.executable, "-c", provision.CONTAIN, *cmd], env=env, capture_output=True, text=True,
                          timeout=180)
    return done.returncode, done.stdout + done.stderr


def _listening(port):
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.append(address)
    return found

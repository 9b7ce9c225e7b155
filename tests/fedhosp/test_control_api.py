"""What the hospitals' address exposes, on a real SuperLink + nginx (loopback only).

The Control API (start/stop runs, register nodes) has no authentication in Flower 1.41's
open-source build and shares the SuperLink's port with the Fleet API; `fedhosp server`
binds the SuperLink to 127.0.0.1 and puts nginx, forwarding /v1/fleet/* only, on the
hospitals' address. These tests send Control API calls to that address (all refused),
check the SuperLink listens on loopback only, and that the Fleet API does get through.
Hospitals without the CA, in plaintext, or with an unregistered key are turned away; so is a
request body larger than our largest model, by nginx; and a site whose key left --sites, at restart.
"""

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.errors import ConfigError
from fedhosp import certs, coordinator, fleet_proxy, processes
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
    certs.site("hosp-a", base / "hosp-a")
    (base / "sites" / "hosp-a.pub").write_bytes((base / "hosp-a" / "hosp-a.pub").read_bytes())
    certs.site("rogue", base / "rogue")
    fleet_port, control_port = processes.free_port(), processes.free_port()
    opts = coordinator.ServerOptions(certs=base / "certs", sites=base / "sites", rounds=1, out=base / "out",
                                     app=ROOT, listen=f"127.0.0.1:{fleet_port}", control_port=control_port)
    with coordinator.coordinator_up(opts) as (children, env):
        yield {"base": base, "ca": made.ca_cert, "fleet": fleet_port, "control": control_port, "env": env,
               "children": children, "opts": opts}
    assert not any(c.alive() for c in children)


def _post(port, path, ca, body=b""):
    verify = ssl.create_default_context(cafile=str(ca))
    return httpx.post(f"https://127.0.0.1:{port}{path}", content=body, headers=HEADERS, verify=verify, timeout=20)


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
    env = processes.flower_env(home)
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


def test_a_plaintext_or_ca_less_supernode_is_refused(link, tmp_path):
    key = ["--auth-supernode-private-key", str(link["base"] / "hosp-a" / "hosp-a.key")]  # a registered key
    # plaintext (Flower itself refuses node auth without TLS, so this one comes without a key);
    # then TLS trusting only the system CAs, with the registered key
    for args in (["--insecure"], key):
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{link['fleet']}", *args, "--max-retries", "1",
               "--port", str(processes.free_port())]
        code, output = _contained(cmd, processes.flower_env(tmp_path / "home"))
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
    cases = [(wrong.ca_cert, "hosp-a", "not trusted with --ca"),
             (link["ca"], "rogue", "refused this site's key (rogue.key): it is not registered")]
    for ca, site, message in cases:
        key = link["base"] / site / f"{site}.key"
        done = subprocess.run([*common, "--ca", str(ca), "--key", str(key)], capture_output=True, text=True,
                              timeout=180, cwd=ROOT)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr


def test_a_body_larger_than_the_largest_model_is_refused_by_nginx(link):
    limit = fleet_proxy.max_body_bytes()
    assert limit >= 2 * 4 * 100_000  # sized from the models: our CNN alone has more than 100k weights
    over = _post(link["fleet"], "/v1/fleet/push-messages", link["ca"], b"\0" * (limit + 1))
    assert over.status_code == 413 and "Request Entity Too Large" in over.text  # nginx's page, not Flower's
    at = _post(link["fleet"], "/v1/fleet/push-messages", link["ca"], b"\0" * limit)
    assert at.status_code == 400 and "nginx" not in at.text, at.text[:300]  # the SuperLink's: not protobuf
    # a client that only claims a 1 GiB body is answered 413 at once, before sending any of it
    head = (f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: {PROTOBUF_MEDIA_TYPE}\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n")
    context = ssl.create_default_context(cafile=str(link["ca"]))
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(head.encode())
        assert tls.recv(64).startswith(b"HTTP/1.1 413")


def test_a_client_that_sends_its_headers_slowly_is_cut_off(link):
    context = ssl.create_default_context(cafile=str(link["ca"]))
    with socket.create_connection(("127.0.0.1", link["fleet"]), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
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
    assert f"client_max_body_size {fleet_proxy.max_body_bytes() // fleet_proxy.MIB}m;" in text
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
        certs.site(name, tmp_path / name)
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


# Runs a command as a child subreaper: Flower's SuperNode starts its SuperExec in a session of
# its own, and an orphaned SuperExec can outlive it; this stops and reaps all of them.
CONTAIN = """
import subprocess, sys
from fedhosp import processes
processes.become_subreaper()
try:
    code = subprocess.call(sys.argv[1:], timeout=150, stderr=subprocess.STDOUT)
finally:
    processes.stop_strays()
sys.exit(code)
"""


def _contained(cmd, env):
    done = subprocess.run([sys.executable, "-c", CONTAIN, *cmd], env=env, capture_output=True, text=True, timeout=180)
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

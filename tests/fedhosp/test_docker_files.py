"""docker/ checked statically (no Docker engine here): compose parses, its services run `fedhosp`
commands our CLI accepts, with the flags the deployment test uses; files and secrets go where they should."""

import re
import shlex
from pathlib import Path

import yaml

from fedhosp import certs
from fedhosp.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
HOSPITALS = [name for name in SERVICES if name.startswith("hosp-")]
# the flags tests/fedhosp/test_deployment.py gives each command (besides ports and test-only timeouts)
SERVER_FLAGS = {"--certs", "--sites", "--rounds", "--out", "--listen", "--min-sites", "--site-wait"}
CLIENT_FLAGS = {"--server", "--ca", "--key", "--data", "--device"}


def _args(service):
    return build_parser().parse_args(SERVICES[service]["command"][1:])


def _flags(service):
    return {a for a in SERVICES[service]["command"] if a.startswith("--")}


def test_every_dockerfile_referenced_exists_and_copies_existing_sources():
    dockerfiles = {s["build"]["dockerfile"] for s in SERVICES.values() if "build" in s}
    assert dockerfiles == {"docker/Dockerfile.server", "docker/Dockerfile.client"}
    for name in dockerfiles:
        text = (ROOT / name).read_text()
        sources = [part for line in text.splitlines() if line.startswith("COPY ")
                   for part in shlex.split(line)[1:-1]]
        assert sources and all((ROOT / s).exists() for s in sources), sources
        assert re.search(r"^USER fedhosp$", text, re.M)  # not root at run time
    assert "nginx" in (DOCKER / "Dockerfile.server").read_text()  # fedhosp server needs it in front of the SuperLink


def test_services_run_the_commands_the_deployment_test_runs():
    server = _args("server")
    assert server.handler.__name__ == "cmd_server" and _flags("server") >= SERVER_FLAGS
    host, port = server.listen.rsplit(":", 1)
    assert SERVICES["server"]["ports"] == [f"{port}:{port}"]  # only the hospitals' (Fleet API) port is published
    assert host == "0.0.0.0"
    assert len(HOSPITALS) == 3
    for name in HOSPITALS:
        client = _args(name)
        assert client.handler.__name__ == "cmd_client" and _flags(name) >= CLIENT_FLAGS
        assert client.server == f"server:{port}"
        assert "ports" not in SERVICES[name]  # a hospital opens nothing: its SuperNode dials out


def test_provisioning_names_the_server_and_keeps_private_keys_at_their_site():
    script = SERVICES["provision"]["command"][0]
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith("fedhosp ")]
    for line in commands:
        build_parser().parse_args(shlex.split(line.replace("$$i", "0"))[1:])
    init = next(shlex.split(c) for c in commands if c.startswith("fedhosp certs init"))
    assert "server" in init[init.index("--server-name") + 1].split(",")  # the name hospitals dial
    mounts = {name: [v.split(":")[0] for v in SERVICES[name]["volumes"]] for name in SERVICES}
    assert not any("certs" in mounts[h] for h in HOSPITALS)  # the CA and server keys stay off the sites
    for name in HOSPITALS:
        own = [m for m in mounts[name] if m.startswith("hosp-")]
        assert own == [f"{name}-site", f"{name}-data"], own  # its own key and data, no one else's
        assert _args(name).key.name == f"{name}.key"
    assert not any(m.startswith("hosp-") for m in mounts["server"])  # public keys only, via `pubs`
    # each hospital's client certificate: its own request, signed with the CA folder, beside its key
    provision = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["provision"]["volumes"]}
    signs = [shlex.split(c.replace("$$i", "0")) for c in commands if c.startswith("fedhosp certs sign")]
    assert len(signs) == 1
    sign = build_parser().parse_args(signs[0][1:])
    assert provision[str(sign.ca_dir)] == "ca-key" and provision[str(sign.out)] == "hosp-0-site"
    assert sign.request == sign.out / "hosp-0.csr"
    assert certs.site_certificate(_args("hosp-0").key).name == "hosp-0.crt"  # where `fedhosp client` looks
    declared = set(COMPOSE["volumes"])
    assert all(m in declared for ms in mounts.values() for m in ms)


def _mounts(service):
    return {v.split(":")[1]: v.split(":")[0] for v in SERVICES[service]["volumes"]}


def test_no_running_service_mounts_the_ca_key():
    script = SERVICES["provision"]["command"][0]
    init = next(shlex.split(line.strip()) for line in script.splitlines() if "fedhosp certs init" in line)
    out = Path(init[init.index("--out") + 1])
    key_folder = str(certs.ca_dir(out))  # where `certs init --out` puts ca.key
    provision = _mounts("provision")
    assert key_folder in provision and provision[key_folder] != provision[str(out)]  # its own volume
    ca_key_volume = provision[key_folder]
    for name in SERVICES:
        if name != "provision":
            assert ca_key_volume not in _mounts(name).values(), name
    assert _mounts("server")["/certs"] == provision[str(out)]  # the server gets ca.crt and its own key only
    assert all(mode == "ro" for v in SERVICES["server"]["volumes"] if v.startswith("certs:")
               for mode in [v.rsplit(":", 1)[1]])

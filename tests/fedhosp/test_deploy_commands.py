"""The Flower commands `fedhosp server` / `fedhosp client` build, checked against the installed Flower's parsers."""

import os
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from common.config import RunConfig, SiteConfig
from common.errors import ConfigError
from common.site_policy import SitePolicy, split_node_config
from fedhosp import certs, coordinator, fleet_proxy, hospital, site_tunnel
from tests.fedhosp import provision
from tests.flower_probes import parse_config_args, superlink_parser, supernode_parser

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


@pytest.fixture
def server_opts(tmp_path):
    certs.init(tmp_path / "certs", ["fl.example.org"])
    (tmp_path / "sites").mkdir()
    certs.site("hosp-a", tmp_path / "hosp-a")
    (tmp_path / "sites" / "hosp-a.pub").write_bytes((tmp_path / "hosp-a" / "hosp-a.pub").read_bytes())
    return coordinator.ServerOptions(certs=tmp_path / "certs", sites=tmp_path / "sites", rounds=3,
                                     out=tmp_path / "run dir", app=ROOT, control_port=9100,
                                     run_config={"local-epochs": 1, "task": "segmentation"})


def test_superlink_runs_with_tls_node_auth_no_installs_on_loopback(server_opts):
    cmd = coordinator.superlink_command(server_opts)
    args = superlink_parser().parse_args(cmd[1:])
    assert (args.host, args.port, args.insecure, args.enable_supernode_auth) == ("127.0.0.1", 9100, False, True)
    assert args.runtime_dependency_install is False
    assert Path(args.ssl_certfile).name == "server.crt" and Path(args.ssl_ca_certfile).name == "ca.crt"
    assert args.database.endswith("superlink.db")  # node ids survive a coordinator restart


def test_flwr_run_gets_our_settings_as_a_valid_run_config(server_opts):
    cmd = coordinator.run_command(server_opts)
    assert cmd[:5] == ["flwr", "run", str(ROOT), coordinator.CONNECTION, "--stream"]
    values = parse_config_args([cmd[cmd.index("--run-config") + 1]])
    declared = _declared()  # what `flwr run` fuses the overrides into: pyproject's own defaults
    assert set(values) <= set(declared)
    cfg = RunConfig.from_mapping({**declared, **values})
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.resume) == (3, 1, False)
    assert (cfg.task, cfg.model, cfg.learning_rate) == ("segmentation", "unet", 0.1)  # the task's, as in simulate
    assert cfg.out_dir == str((server_opts.out).resolve())
    config = coordinator.flwr_config(server_opts)
    assert 'address = "127.0.0.1:9100"' in config and "ca.crt" in config


def test_register_uses_each_sites_public_key_and_name(server_opts):
    keys = coordinator.site_keys(server_opts.sites)
    assert list(keys) == ["hosp-a"]
    assert coordinator.register_command("hosp-a", keys["hosp-a"]) == [
        "flwr", "supernode", "register", str(keys["hosp-a"]), coordinator.CONNECTION, "--name", "hosp-a"]


def test_sites_folder_must_hold_public_keys_only(tmp_path):
    (tmp_path / "a").mkdir()
    certs.site("a", tmp_path / "a")
    with pytest.raises(ConfigError, match="private keys"):
        coordinator.site_keys(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no NAME\.pub"):
        coordinator.site_keys(tmp_path / "empty")


def test_supernode_gets_tls_auth_and_the_site_config(tmp_path):
    keys = certs.site("hosp-a", tmp_path / "site a")
    opts = hospital.ClientOptions(server="fl.example.org:9092", ca=tmp_path / "ca.crt", key=keys.private,
                                  data=tmp_path / "dicom data", device="cpu", privacy_budget=6.5, runtime_port=9200,
                                  tunnel_port=9201)
    loopback = site_tunnel.loopback_pair(tmp_path / "start")
    cmd = hospital.supernode_command(opts, loopback[0])
    args = supernode_parser().parse_args(cmd[1:])
    # TLS with node auth, to the site's tunnel, which alone it trusts; the tunnel dials the coordinator
    assert args.superlink == "127.0.0.1:9201" and not args.insecure
    assert Path(args.root_certificates) == loopback[0].resolve()
    assert Path(args.auth_supernode_private_key) == keys.private.resolve()
    assert (args.host, args.port, args.runtime_dependency_install) == ("127.0.0.1", 9200, False)
    site = SiteConfig.from_mapping(parse_config_args([args.node_config]))  # what the ClientApp will read
    assert site.data_path == str((tmp_path / "dicom data").resolve())
    assert site.state_dir == str((tmp_path / "site a" / "state").resolve())
    assert (site.device, site.privacy_budget) == ("cpu", 6.5)


def test_the_sites_policy_travels_in_its_node_config_and_a_budget_is_always_set(tmp_path):
    made = certs.init(tmp_path / "certs", ["h"])
    keys = provision.site("hosp-a", tmp_path / "site", tmp_path / "certs")
    (tmp_path / "data").mkdir()
    opts = hospital.ClientOptions(server="h:1", ca=made.ca_cert, key=keys.private, data=tmp_path / "data",
                                  policy={"dp-delta": 1e-5, "max-image-size": 64, "allow-no-dp": True})
    hospital.check(opts)
    node = parse_config_args([hospital.node_config(opts)])
    policy, rest = split_node_config(node)
    assert policy == SitePolicy(dp_delta=1e-5, max_image_size=64, allow_no_dp=True)
    assert SiteConfig.from_mapping(rest).privacy_budget == hospital.DEFAULT_PRIVACY_BUDGET  # none given: 10
    with pytest.raises(ConfigError, match="--privacy-budget must be > 0"):
        hospital.check(replace(opts, privacy_budget=0.0))
    with pytest.raises(ConfigError, match="unknown key"):
        hospital.check(replace(opts, policy={"max-imge-size": 64}))
    with pytest.raises(ConfigError, match="max-image-size"):
        hospital.check(replace(opts, policy={"max-image-size": 8}))


def test_client_checks_its_inputs_before_starting_anything(tmp_path):
    certs.init(tmp_path / "certs", ["h"])
    keys = provision.site("hosp-a", tmp_path, tmp_path / "certs")
    (tmp_path / "data").mkdir()
    opts = hospital.ClientOptions(server="h:1", ca=tmp_path / "certs" / "ca.crt", key=keys.private,
                                  data=tmp_path / "data")
    hospital.check(opts)
    assert opts.certificate == tmp_path / "hosp-a.crt"  # --cert: NAME.crt beside the key by default
    (tmp_path / "hosp-a.crt").rename(tmp_path / "elsewhere.crt")
    with pytest.raises(ConfigError, match="certs sign"):
        hospital.check(opts)
    hospital.check(replace(opts, cert=tmp_path / "elsewhere.crt"))
    (tmp_path / "elsewhere.crt").rename(tmp_path / "hosp-a.crt")
    os.chmod(keys.private, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        hospital.check(opts)
    os.chmod(keys.private, 0o600)
    with pytest.raises(ConfigError, match="no such folder"):
        hospital.check(replace(opts, data=tmp_path / "nope"))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        hospital.check(replace(opts, server="h"))


def test_proxy_config_forwards_only_the_fleet_api(tmp_path):
    made = certs.init(tmp_path, ["fl"])
    text = fleet_proxy.render("0.0.0.0", 9092, 9100, made, tmp_path)
    assert "listen 0.0.0.0:9092 ssl;" in text
    assert text.count("location ") == 2 and "location /v1/fleet/ {" in text and "location / { return 404; }" in text
    assert "proxy_pass https://127.0.0.1:9100/v1/fleet/;" in text and "proxy_ssl_verify on;" in text
    assert "[::]:9092" in fleet_proxy.render("::", 9092, 9100, made, tmp_path)

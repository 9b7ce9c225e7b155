"""The provisioning kit: a CA, a server certificate TLS clients accept by name, site keys Flower accepts."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.errors import ConfigError
from fedhosp import certs
from fedhosp.cli import main
from tests.flower_probes import public_key_to_bytes, try_load_public_key


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_a_server_certificate_for_every_name(tmp_path):
    made = certs.init(tmp_path, ["fl.example.org", "10.0.0.5"])
    assert _mode(made.ca_key) == 0o600 and _mode(made.key) == 0o600
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]


def test_the_ca_key_is_kept_out_of_the_folder_the_server_reads(tmp_path):
    made = certs.init(tmp_path / "certs", ["fl"])
    assert made.ca_key == tmp_path / "certs-ca" / "ca.key" and made.ca_key.is_file()
    assert _mode(made.ca_key) == 0o600 and _mode(made.ca_key.parent) == 0o700
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.crt", "server.crt", "server.key"]
    certs.ServerCerts.in_dir(tmp_path / "certs").check()  # what the coordinator needs is all there
    with pytest.raises(ConfigError, match="refusing to overwrite"):  # the CA key is never overwritten either
        certs.init(tmp_path / "other", ["fl"], ca_out=tmp_path / "certs-ca")
    (tmp_path / "certs" / "ca.key").write_bytes(made.ca_key.read_bytes())  # put back where the server reads
    with pytest.raises(ConfigError, match="move it offline"):
        certs.ServerCerts.in_dir(tmp_path / "certs").check()
    with pytest.raises(ConfigError, match="inside"):
        certs.init(tmp_path / "third", ["fl"], ca_out=tmp_path / "third" / "ca")
    offline = certs.init(tmp_path / "fourth", ["fl"], ca_out=tmp_path / "usb")
    assert offline.ca_key == tmp_path / "usb" / "ca.key" and not (tmp_path / "fourth-ca").exists()


@pytest.mark.parametrize(("name", "accepted"), [("fl.example.org", True), ("localhost", True),
                                                ("other.example.org", False)])
def test_a_tls_client_trusting_only_the_ca_accepts_exactly_the_server_names(tmp_path, name, accepted):
    made = certs.init(tmp_path, ["fl.example.org"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(made.cert, made.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(made.ca_cert))
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                if accepted:
                    client_ctx.wrap_socket(raw, server_hostname=name).close()
                else:
                    with pytest.raises(ssl.SSLCertVerificationError):
                        client_ctx.wrap_socket(raw, server_hostname=name)
        finally:
            thread.join(timeout=10)


def test_site_keys_are_what_flower_reads_and_the_private_one_is_0600(tmp_path):
    keys = certs.site("st-marys", tmp_path / "st-marys")
    assert _mode(keys.private) == 0o600
    private = load_ssh_private_key(keys.private.read_bytes(), password=None)  # flower-supernode's loader
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public = try_load_public_key(keys.public)  # `flwr supernode register`'s loader (NIST curves only)
    assert public == public_key_to_bytes(private.public_key())
    assert keys.public.read_text().rstrip().endswith(" st-marys")


def test_keys_are_never_overwritten_and_names_are_checked(tmp_path):
    certs.init(tmp_path / "c", ["fl"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        certs.init(tmp_path / "c", ["fl"])
    certs.site("a", tmp_path / "a")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        certs.site("a", tmp_path / "a")
    with pytest.raises(ConfigError, match="site name"):
        certs.site("../evil", tmp_path / "b")
    with pytest.raises(ConfigError, match="neither a host name nor an IP"):
        certs.init(tmp_path / "d", ["bad name!"])


def test_cli_certs_commands(tmp_path, capsys):
    assert main(["certs", "init", "--out", str(tmp_path / "certs"), "--server-name", "fl.example.org,10.0.0.5"]) == 0
    assert main(["certs", "site", "hosp-a", "--out", str(tmp_path / "hosp-a")]) == 0
    out = capsys.readouterr().out
    assert "ca.crt" in out and "hosp-a.pub" in out
    assert main(["certs", "site", "hosp-a", "--out", str(tmp_path / "hosp-a")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err

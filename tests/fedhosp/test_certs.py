"""The provisioning kit: a CA, a server certificate TLS clients accept by name, site keys Flower accepts."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

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


def test_a_site_request_signed_at_the_coordinator_is_a_client_certificate_of_the_sites_own_key(tmp_path, capsys):
    made = certs.init(tmp_path / "certs", ["fl.example.org"])
    assert (tmp_path / "certs-ca" / "ca.crt").read_bytes() == made.ca_cert.read_bytes()  # `sign` needs only OUT-ca/
    assert main(["certs", "site", "hosp-a", "--out", str(tmp_path / "hosp-a")]) == 0
    site = tmp_path / "hosp-a"
    assert "hosp-a.csr" in capsys.readouterr().out
    assert _mode(site / "hosp-a.key") == 0o600 and sorted(p.name for p in site.iterdir()) == [
        "hosp-a.csr", "hosp-a.key", "hosp-a.pub"]
    request = x509.load_pem_x509_csr((site / "hosp-a.csr").read_bytes())
    private = load_ssh_private_key((site / "hosp-a.key").read_bytes(), password=None)
    assert request.is_signature_valid and request.public_key() == private.public_key()  # the node-auth key itself
    # at the coordinator: only the .csr travels; the CA folder signs it
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "hosp-a.csr").write_bytes((site / "hosp-a.csr").read_bytes())
    assert main(["certs", "sign", str(tmp_path / "inbox" / "hosp-a.csr"), "--ca-dir", str(tmp_path / "certs-ca"),
                 "--out", str(tmp_path / "outbox")]) == 0
    crt = tmp_path / "outbox" / "hosp-a.crt"
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(made.ca_cert.read_bytes()))
    assert cert.public_key() == private.public_key()
    assert cert.subject.rfc4514_string() == "CN=hosp-a"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]  # a client certificate: useless as a server's
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    (site / "hosp-a.crt").write_bytes(crt.read_bytes())
    assert certs.check_site_certificate(site / "hosp-a.crt", site / "hosp-a.key", made.ca_cert) == cert
    assert main(["certs", "sign", str(tmp_path / "inbox" / "hosp-a.csr"), "--ca-dir", str(tmp_path / "certs-ca"),
                 "--out", str(tmp_path / "outbox")]) == 2  # never overwritten
    assert "refusing to overwrite" in capsys.readouterr().err


def test_only_the_consortium_ca_signs_and_a_site_checks_its_certificate_before_it_starts(tmp_path):
    made = certs.init(tmp_path / "certs", ["fl"])
    certs.init(tmp_path / "other", ["fl"])  # another CA, with the same name
    keys = certs.site("hosp-a", tmp_path / "hosp-a")
    with pytest.raises(ConfigError, match=r"no ca\.key"):
        certs.sign(keys.request, tmp_path / "certs", tmp_path / "x")  # the server's folder cannot sign
    forged = certs.sign(keys.request, tmp_path / "other-ca", tmp_path / "forged")
    with pytest.raises(ConfigError, match="not signed by the consortium CA"):
        certs.check_site_certificate(forged, keys.private, made.ca_cert)
    good = certs.sign(keys.request, tmp_path / "certs-ca", tmp_path / "hosp-a")
    other = certs.site("hosp-b", tmp_path / "hosp-b")
    with pytest.raises(ConfigError, match="was not issued for --key"):
        certs.check_site_certificate(good, other.private, made.ca_cert)
    with pytest.raises(ConfigError, match="certs sign"):
        certs.check_site_certificate(tmp_path / "hosp-b" / "hosp-b.crt", other.private, made.ca_cert)  # none yet
    renamed = tmp_path / "hosp-c.csr"
    renamed.write_bytes(other.request.read_bytes())
    with pytest.raises(ConfigError, match="asks for a certificate named 'hosp-b'"):
        certs.sign(renamed, tmp_path / "certs-ca", tmp_path / "x")
    tampered = tmp_path / "t" / "hosp-b.csr"
    tampered.parent.mkdir()
    text = other.request.read_text().splitlines()
    body = "".join(text[1:-1])
    for at in (60, len(body) - 12):  # in the key, in the signature
        flipped = body[:at] + ("A" if body[at] != "A" else "B") + body[at + 1:]
        tampered.write_text("\n".join([text[0], *[flipped[i:i + 64] for i in range(0, len(flipped), 64)], text[-1]]))
        with pytest.raises(ConfigError, match=r"signature does not match|not a PEM"):
            certs.sign(tampered, tmp_path / "certs-ca", tmp_path / "x")
    assert not (tmp_path / "x").exists()

"""The TLS kernel module without servers: certificates name their kind and hosts, the reloader
answers a change only once and keeps the last good files, and client TLS survives the cluster
file and the environment."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from modelyard.settings import TLSSettings
from modelyard.tls import (
    CALLERS,
    CertificateReloader,
    ClientTLS,
    LocalCA,
    _kind_from_names,
    certificate_expiry,
    kind_uri,
)
from modelyard_cli.app import app


def test_a_certificate_names_its_kind_and_hosts_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path)
    issued = ca.issue("model_server", hosts=["model-server-1", "10.0.0.7"])
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://modelyard/model_server"]
    assert san.get_values_for_type(x509.DNSName) == ["model-server-1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    assert oct(issued.key_file.stat().st_mode & 0o777) == "0o600"
    # A second load finds the same CA.
    assert LocalCA.load_or_create(tmp_path).cert == ca.cert
    assert ca.issued_this(issued.cert_file)
    assert not LocalCA.create(tmp_path / "other").issued_this(issued.cert_file)


def test_the_kind_comes_only_from_a_modelyard_spiffe_uri() -> None:
    assert _kind_from_names([b"localhost", kind_uri("gateway").encode()]) == "gateway"
    assert _kind_from_names([b"spiffe://elsewhere/gateway", b"gateway"]) is None
    assert CALLERS["model_server"]["modelyard.v1.ModelServerService"] == {"gateway", "monitor"}
    # The registry may only ask a model server to measure (the proof of a deployment change).
    evaluate = CALLERS["model_server"]["modelyard.v1.ModelServerService/EvaluateOptimizations"]
    assert evaluate == {"gateway", "monitor", "registry"}


def test_the_reloader_answers_a_change_once_and_keeps_the_last_good_files(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path)
    issued = ca.issue("registry")
    tls = TLSSettings(
        enabled=True, cert_file=issued.cert_file, key_file=issued.key_file, ca_file=ca.cert_file
    )
    reloader = CertificateReloader(tls, kind="registry")
    first_expiry = reloader.expires_at
    assert reloader.fetch() is None

    ca.issue("registry", days=10)
    stat = issued.cert_file.stat()
    os.utime(issued.cert_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert reloader.fetch() is not None
    assert reloader.fetch() is None
    assert reloader.reloads == 1
    assert reloader.expires_at == certificate_expiry(issued.cert_file).timestamp() != first_expiry

    old_cert = issued.cert_file.read_bytes()
    issued.cert_file.write_text("not a certificate")
    assert reloader.fetch() is None  # half-written: keep serving the last good one
    assert reloader.reloads == 1

    # A new key beside the old certificate (a rotation half done) is not taken either.
    ca.issue("registry")
    good_cert = issued.cert_file.read_bytes()
    issued.cert_file.write_bytes(old_cert)
    assert reloader.fetch() is None
    issued.cert_file.write_bytes(good_cert)
    assert reloader.fetch() is not None
    assert reloader.reloads == 2


def test_client_tls_round_trips_through_json_and_the_environment(tmp_path: Path) -> None:
    tls = ClientTLS(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c-key.pem")
    assert ClientTLS.from_json(tls.to_json()) == tls
    assert ClientTLS.from_env(tls.to_env()) == tls
    assert ClientTLS.from_env({}) is None
    assert ClientTLS.from_settings(TLSSettings()) is None


def test_modelyard_certs_writes_a_ca_and_a_certificate_per_kind(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["certs", str(tmp_path), "--hosts", "gateway,127.0.0.1", "--days", "2"])
    assert result.exit_code == 0, result.output
    for kind in ("gateway", "model_server", "registry", "monitor", "client", "redis"):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{kind}.pem").read_bytes())
        assert kind_uri(kind) in str(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
    with pytest.raises(OSError):
        LocalCA.load(tmp_path / "nowhere")

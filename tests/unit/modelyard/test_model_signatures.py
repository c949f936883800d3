"""Verifying OpenSSF model signatures offline: key- and certificate-based bundles made by the
model-signing package's own signer verify and name their signer; a foreign key or CA, other
bytes, a directory manifest, garbage and a missing signature where one is required are refused."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import model_signing
import pytest

from modelyard.errors import ModelSignatureInvalid
from modelyard.model_signatures import SignaturePolicy, SignatureVerifier
from tests.signing_kit import CertificateSigner, KeySigner

ARTIFACT = b"PK\x03\x04 not really a model, but signatures do not care" * 100
SHA256 = hashlib.sha256(ARTIFACT).hexdigest()


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("signing")
    return {
        "key": KeySigner.create(root, "team"),
        "foreign_key": KeySigner.create(root, "stranger"),
        "cert": CertificateSigner.create(root, "corp"),
        "foreign_cert": CertificateSigner.create(root, "rogue", subject="ml-team@example.com"),
        "root": root,
    }


def _verifier(material: dict[str, object]) -> SignatureVerifier:
    key, cert = material["key"], material["cert"]
    assert isinstance(key, KeySigner) and isinstance(cert, CertificateSigner)
    return SignatureVerifier([key.public_key], [cert.ca])


def test_a_key_based_signature_verifies_and_names_the_key(
    material: dict[str, object], tmp_path: Path
) -> None:
    key = material["key"]
    assert isinstance(key, KeySigner)
    signer = _verifier(material).verify(key.sign(ARTIFACT, tmp_path), sha256=SHA256)
    assert signer.startswith("key ") and len(signer) == 4 + 16


def test_a_certificate_based_signature_verifies_and_names_the_subject(
    material: dict[str, object], tmp_path: Path
) -> None:
    cert = material["cert"]
    assert isinstance(cert, CertificateSigner)
    signer = _verifier(material).verify(cert.sign(ARTIFACT, tmp_path), sha256=SHA256)
    assert signer == "CN=ml-team@example.com issued by CN=corp CA"


@pytest.mark.parametrize("who", ["foreign_key", "foreign_cert"])
def test_a_foreign_signer_is_refused(material: dict[str, object], who: str, tmp_path: Path) -> None:
    signer = material[who]
    assert isinstance(signer, KeySigner | CertificateSigner)
    with pytest.raises(ModelSignatureInvalid) as caught:
        _verifier(material).verify(signer.sign(ARTIFACT, tmp_path), sha256=SHA256)
    assert caught.value.field == "metadata.model_signature"


def test_a_signature_over_other_bytes_is_refused(material: dict[str, object], tmp_path: Path) -> None:
    key = material["key"]
    assert isinstance(key, KeySigner)
    bundle = key.sign(ARTIFACT, tmp_path)
    with pytest.raises(ModelSignatureInvalid, match="signs other bytes"):
        _verifier(material).verify(bundle, sha256=hashlib.sha256(ARTIFACT + b"!").hexdigest())


def test_a_tampered_envelope_is_refused(material: dict[str, object], tmp_path: Path) -> None:
    key = material["key"]
    assert isinstance(key, KeySigner)
    # Re-point the signed statement at other bytes, keeping the signature: it no longer verifies.
    document = json.loads(key.sign(ARTIFACT, tmp_path))
    envelope = document["dsseEnvelope"]
    statement = base64.b64decode(envelope["payload"]).decode()
    other = hashlib.sha256(b"other bytes").hexdigest()
    envelope["payload"] = base64.b64encode(statement.replace(SHA256, other).encode()).decode()
    with pytest.raises(ModelSignatureInvalid, match="not made by any trusted key"):
        _verifier(material).verify(json.dumps(document).encode(), sha256=other)


def test_a_directory_manifest_is_refused(material: dict[str, object], tmp_path: Path) -> None:
    key = material["key"]
    assert isinstance(key, KeySigner)
    model = tmp_path / "dir"
    model.mkdir()
    (model / "a").write_bytes(ARTIFACT)
    (model / "b").write_bytes(b"more")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key.private_key).sign(
        model, tmp_path / "dir.sig"
    )
    with pytest.raises(ModelSignatureInvalid, match="one file"):
        _verifier(material).verify((tmp_path / "dir.sig").read_bytes(), sha256=SHA256)


@pytest.mark.parametrize("bundle", [b"not json", b"{}", b'{"verificationMaterial": {}}', b"[1]"])
def test_garbage_is_refused(material: dict[str, object], bundle: bytes) -> None:
    with pytest.raises(ModelSignatureInvalid):
        _verifier(material).verify(bundle, sha256=SHA256)


def test_the_policy_requires_and_checks(material: dict[str, object], tmp_path: Path) -> None:
    key = material["key"]
    assert isinstance(key, KeySigner)
    policy = SignaturePolicy(_verifier(material))
    assert policy.check(b"", sha256=SHA256, required=False, field="f") == ""
    with pytest.raises(ModelSignatureInvalid, match="its model requires"):
        policy.check(b"", sha256=SHA256, required=True, field="f")
    with pytest.raises(ModelSignatureInvalid, match="this cluster requires"):
        SignaturePolicy(_verifier(material), require_all=True).check(
            b"", sha256=SHA256, required=False, field="f"
        )
    assert policy.check(key.sign(ARTIFACT, tmp_path), sha256=SHA256, required=True, field="f").startswith(
        "key "
    )
    with pytest.raises(ModelSignatureInvalid, match="trusts no signing key"):
        SignaturePolicy(SignatureVerifier()).check(
            key.sign(ARTIFACT, tmp_path), sha256=SHA256, required=False, field="f"
        )

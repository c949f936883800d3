"""Real signing material for the tests: elliptic-curve keys, a local CA with a code-signing
certificate, and OpenSSF model signatures made with the `model-signing` package's own signer
(what `model_signing sign key|certificate` runs)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import model_signing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _write_certificate(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certificates,
        crl_sign=sign_certificates,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class KeySigner:
    """A key pair: signs key-based; `public_key` is what a cluster trusts."""

    private_key: Path
    public_key: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> KeySigner:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        public = directory / f"{name}.pub.pem"
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(private_key=_write_key(directory / f"{name}.key.pem", key), public_key=public)

    def sign(self, artifact: bytes, directory: Path) -> bytes:
        model, signature = _paths(directory, artifact)
        model_signing.signing.Config().use_elliptic_key_signer(private_key=self.private_key).sign(
            model, signature
        )
        return signature.read_bytes()


@dataclass(frozen=True)
class CertificateSigner:
    """A local CA and a code-signing certificate it issued: signs certificate-based; `ca` is
    what a cluster trusts."""

    ca: Path
    certificate: Path
    private_key: Path
    subject: str

    @classmethod
    def create(cls, directory: Path, name: str, subject: str = "ml-team@example.com") -> CertificateSigner:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(sign_certificates=True), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(sign_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cls(
            ca=_write_certificate(directory / f"{name}.ca.pem", ca),
            certificate=_write_certificate(directory / f"{name}.cert.pem", leaf),
            private_key=_write_key(directory / f"{name}.cert-key.pem", key),
            subject=subject,
        )

    def sign(self, artifact: bytes, directory: Path) -> bytes:
        model, signature = _paths(directory, artifact)
        model_signing.signing.Config().use_certificate_signer(
            private_key=self.private_key, signing_certificate=self.certificate, certificate_chain=[self.ca]
        ).sign(model, signature)
        return signature.read_bytes()


def _paths(directory: Path, artifact: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "model.pt"
    model.write_bytes(artifact)
    return model, directory / "model.sig"

"""OpenSSF model signatures (the `model-signing` package's format), verified offline.

A signature is the JSON bundle `model_signing sign key|certificate` writes next to a model
(`model.sig`): a DSSE envelope whose payload is an in-toto statement listing each file of the
model with its sha256, signed with an elliptic-curve key (key-based) or with a certificate's
key, the certificate chain included (certificate-based). Modelyard's model is one file, so the
statement must list exactly one resource, hashed with sha256, whose digest is the artifact's
sha256. That binds the signature to the bytes without hashing them again: the registry checks
the bytes against the same sha256 while it stores them, and the model server before it loads.

`SignatureVerifier` holds the cluster's trust: PEM public keys, and PEM CA certificates that
signing certificates must chain to. The cryptography (DSSE pre-authentication encoding,
ECDSA, the X.509 chain through pyOpenSSL, the statement's subject digest) is model-signing's own
verifier code (its `Verifier` classes for keys and certificates); nothing here reaches a network,
so Sigstore keyless bundles (which need Rekor and Fulcio's trust roots) are not accepted.
No grpc here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore_pb

from modelyard.errors import ModelSignatureInvalid
from modelyard.settings import SigningSettings

__all__ = ["SignaturePolicy", "SignatureVerifier", "MAX_SIGNATURE_BYTES"]

log = logging.getLogger(__name__)

MAX_SIGNATURE_BYTES = 1024 * 1024
"""Largest signature bundle accepted (a certificate-based one with its chain is a few KiB)."""


class SignatureVerifier:
    """Verifies model signatures against the trusted keys and CA certificates.

    Args:
        public_keys: PEM files, one elliptic-curve public key each (key-based signatures).
        ca_certificates: PEM files of CA certificates (certificate-based signatures); a
            signing certificate must chain to one of them.

    Usage::

        verifier = SignatureVerifier(settings.trusted_public_keys, settings.trusted_ca_certificates)
        signer = verifier.verify(bundle_bytes, sha256="ab12...")  # "key ab12cd34ef56" / a subject
    """

    def __init__(self, public_keys: Sequence[Path] = (), ca_certificates: Sequence[Path] = ()) -> None:
        self._keys: list[tuple[str, sign_ec_key.Verifier]] = []
        for path in public_keys:
            verifier = sign_ec_key.Verifier(Path(path))
            self._keys.append((_key_id(Path(path)), verifier))
        self._certificates = (
            sign_certificate.Verifier([Path(p) for p in ca_certificates]) if ca_certificates else None
        )

    @property
    def configured(self) -> bool:
        """Whether any key or CA is trusted (without one, every signature is refused)."""
        return bool(self._keys) or self._certificates is not None

    def verify(self, bundle: bytes, *, sha256: str, field: str = "metadata.model_signature") -> str:
        """Check that `bundle` signs the artifact with hex sha256 `sha256` by a trusted signer.

        Returns:
            Who signed it: "key <first 16 hex digits of the key's sha256>" or the signing
            certificate's subject (RFC 4514), followed by "issued by" and its issuer.

        Raises:
            ModelSignatureInvalid: the bundle is malformed, signed by no trusted key or
                certificate, or over other bytes (naming `field`).
        """
        if not self.configured:
            raise ModelSignatureInvalid(
                "this cluster trusts no signing key or CA certificate, so it cannot verify a "
                "model signature (set trusted_public_keys / trusted_ca_certificates)",
                field=field,
            )
        if len(bundle) > MAX_SIGNATURE_BYTES:
            raise ModelSignatureInvalid(
                f"the model signature is larger than {MAX_SIGNATURE_BYTES} bytes", field=field
            )
        signature, material = _read_bundle(bundle, field)
        errors: list[str] = []
        if "x509CertificateChain" in material:
            if self._certificates is None:
                raise ModelSignatureInvalid(
                    "the model signature is certificate-based, but this cluster trusts no CA certificate",
                    field=field,
                )
            try:
                manifest = self._certificates.verify(signature)
            except Exception as exc:  # noqa: BLE001 - the verifier raises many kinds
                raise ModelSignatureInvalid(
                    "the model signature's certificate does not chain to a trusted CA, or the "
                    f"signature does not verify ({type(exc).__name__})",
                    field=field,
                ) from None
            signer = _certificate_signer(material)
        elif "publicKey" in material:
            manifest = None
            signer = ""
            for key_id, verifier in self._keys:
                try:
                    manifest = verifier.verify(signature)
                except Exception as exc:  # noqa: BLE001 - the verifier raises many kinds
                    errors.append(type(exc).__name__)
                    continue
                signer = f"key {key_id}"
                break
            if manifest is None:
                raise ModelSignatureInvalid(
                    "the model signature was not made by any trusted key", field=field
                )
        else:
            raise ModelSignatureInvalid(
                "the model signature is neither key- nor certificate-based (a Sigstore keyless "
                "bundle needs the network to verify and is not accepted)",
                field=field,
            )
        _check_manifest(manifest, sha256, field)
        return signer


class SignaturePolicy:
    """When a signature is needed, and verifying one: what the registry applies at upload and
    the model server at every load, from the same `SigningSettings`.

    Args:
        verifier: The trusted keys and CA certificates.
        require_all: Every version needs a signature, whatever its model says.
    """

    def __init__(self, verifier: SignatureVerifier, *, require_all: bool = False) -> None:
        self.verifier = verifier
        self.require_all = require_all

    @classmethod
    def from_settings(cls, settings: SigningSettings) -> SignaturePolicy:
        return cls(
            SignatureVerifier(settings.trusted_public_keys, settings.trusted_ca_certificates),
            require_all=settings.require_signatures,
        )

    def check(self, bundle: bytes, *, sha256: str, required: bool, field: str) -> str:
        """Verify `bundle` (if any) for the artifact with hex `sha256`. Blocking (file and
        crypto work): call it off the event loop.

        Args:
            bundle: The signature bundle; empty when the version is unsigned.
            sha256: The artifact's hex sha256 (checked against its bytes separately).
            required: The model requires a signature.
            field: The request field a refusal names.

        Returns:
            The verified signer, or "" for an unsigned version that needs no signature.

        Raises:
            ModelSignatureInvalid: unsigned but required, or the signature does not verify.
        """
        if not bundle:
            if required or self.require_all:
                why = "its model requires" if required else "this cluster requires"
                raise ModelSignatureInvalid(
                    f"the version is unsigned, and {why} a model signature by a trusted signer "
                    "(OpenSSF model signing: model_signing sign key|certificate <artifact>)",
                    field=field,
                )
            return ""
        return self.verifier.verify(bundle, sha256=sha256, field=field)


def _read_bundle(bundle: bytes, field: str) -> tuple[Any, dict[str, Any]]:
    try:
        document = json.loads(bundle)
        material = document["verificationMaterial"]
        if not isinstance(material, dict):
            raise TypeError("verificationMaterial")
        # model-signing reads bundles from a file; a temporary one costs nothing next to the
        # artifact, and keeps its format adjustments (older bundles) in one place.
        with tempfile.NamedTemporaryFile(suffix=".sig") as file:
            file.write(bundle)
            file.flush()
            signature = sign_sigstore_pb.Signature.read(Path(file.name))
    except Exception:  # noqa: BLE001 - malformed in any way
        raise ModelSignatureInvalid(
            "the model signature is not an OpenSSF model signing bundle (the JSON that "
            "`model_signing sign` writes)",
            field=field,
        ) from None
    return signature, material


def _check_manifest(manifest: Any, sha256: str, field: str) -> None:
    method = manifest.serialization_type.get("method")
    hash_type = manifest.serialization_type.get("hash_type")
    resources = list(manifest.resource_descriptors())
    if method != "files" or hash_type != "sha256" or len(resources) != 1:
        raise ModelSignatureInvalid(
            "the model signature must sign one file hashed with sha256 (model_signing sign "
            "<artifact file>, the default file serialization)",
            field=field,
        )
    digest = resources[0].digest
    if digest.algorithm != "sha256" or digest.digest_value.hex() != sha256.lower():
        raise ModelSignatureInvalid(
            "the model signature is valid but signs other bytes than this artifact "
            f"(it signs sha256 {digest.digest_value.hex()[:64]}, the artifact is {sha256})",
            field=field,
            metadata={"signed_sha256": digest.digest_value.hex()[:64]},
        )


def _key_id(path: Path) -> str:
    """The key's identity as model-signing writes it in a bundle's hint (sha256 of its PEM),
    shortened to 16 hex digits."""
    key = serialization.load_pem_public_key(path.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()[:16]


def _certificate_signer(material: dict[str, Any]) -> str:
    try:
        raw = material["x509CertificateChain"]["certificates"][0]["rawBytes"]
        certificate = x509.load_der_x509_certificate(base64.b64decode(raw))
        subject = certificate.subject.rfc4514_string()
        issuer = certificate.issuer.rfc4514_string()
    except Exception:  # noqa: BLE001 - verified already; only the description failed
        return "certificate"
    return f"{subject} issued by {issuer}"[:512]

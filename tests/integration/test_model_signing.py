"""Signed models on a real registry and model server (port 0, real Redis), both trusting a test
key and a test CA: a key-signed TorchScript model and a certificate-signed exported program
upload, show their signer (GetModelVersion, audit log) and serve; unsigned, foreign-signed and
tampered artifacts of a model that requires a signature are refused at upload with nothing
stored and, planted in the store, at load with nothing run."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.settings import ServerSettings, SigningSettings, load_settings
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.model_server_service_pb2_grpc import ModelServerServiceStub
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings
from tests.artifact_corpus import (
    CORPUS,
    TORCH_EXPORT,
    TORCHSCRIPT,
    TinyNet,
    export_archive,
    torchscript_archive,
)
from tests.integration import test_model_server as base
from tests.integration.test_artifact_safety import plant, stored_artifacts, upload, wait_for_version
from tests.integration.test_model_server import failure
from tests.integration.test_registry import bad_fields, error_info
from tests.signing_kit import CertificateSigner, KeySigner

pytestmark = pytest.mark.integration

MODEL = "mlp"

channels = base.channels


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("signers")
    return {
        "key": KeySigner.create(root, "team"),
        "cert": CertificateSigner.create(root, "corp"),
        "foreign_key": KeySigner.create(root, "stranger"),
        "foreign_cert": CertificateSigner.create(root, "rogue"),
    }


@pytest.fixture
def signing(signers: dict[str, Any]) -> SigningSettings:
    return SigningSettings(
        trusted_public_keys=(signers["key"].public_key,), trusted_ca_certificates=(signers["cert"].ca,)
    )


@pytest.fixture
async def registry(redis_settings: Any, tmp_path: Path, signing: SigningSettings) -> Any:
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
            retention_s=0.0,
            signing=signing,
        )
    )
    await app.start()
    yield app
    await app.aclose()


@pytest.fixture
async def model_server(redis_settings: Any, registry: RegistryApp, signing: SigningSettings) -> Any:
    app = ModelServerApp(
        load_settings(
            ModelServerSettings,
            server=ServerSettings(port=0, drain_grace_s=2.0, heartbeat_interval_s=0.2),
            redis=redis_settings,
            registry_address=registry.address,
            reconcile_interval_s=0.2,
            max_batch_size=16,
            drain_settle_s=0.05,
            signing=signing,
        )
    )
    await app.start()
    yield app
    await app.aclose()


@pytest.fixture
def registry_stub(registry: RegistryApp, channels: Any) -> Any:
    return RegistryServiceStub(channels(registry.address))


@pytest.fixture
def stub(model_server: ModelServerApp, channels: Any) -> Any:
    return ModelServerServiceStub(channels(model_server.address))


def _sign(signer: Any, data: bytes, tmp_path: Path) -> bytes:
    return bytes(signer.sign(data, tmp_path / f"sig-{hashlib.sha256(data).hexdigest()[:8]}"))


async def test_signed_models_upload_show_their_signer_and_serve(
    registry_stub: Any, stub: Any, signers: dict[str, Any], tmp_path: Path
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL, require_signature=True))
    got = await registry_stub.GetModel(reg.GetModelRequest(name=MODEL))
    assert got.model.require_signature
    x = torch.randn(3, 4)
    with torch.inference_mode():
        expected = TinyNet().eval()(x)
    cases = [
        (torchscript_archive(), TORCHSCRIPT, signers["key"], "key "),
        (export_archive(), TORCH_EXPORT, signers["cert"], "CN=ml-team@example.com issued by CN=corp CA"),
    ]
    for data, fmt, signer, shown in cases:
        bundle = _sign(signer, data, tmp_path)
        version = await upload(registry_stub, data, fmt, extra={"model_signature": bundle})
        record = await registry_stub.GetModelVersion(reg.GetModelVersionRequest(model=MODEL, version=version))
        assert record.model_version.signer.startswith(shown), record.model_version.signer
        assert record.model_version.model_signature == bundle
        await registry_stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="production", version=version))
        await wait_for_version(stub, MODEL, version, ms.VERSION_STATE_READY)
        response = await stub.Infer(
            ms.InferRequest(model=MODEL, version=version, inputs=[tensor_to_proto("input", x)])
        )
        torch.testing.assert_close(tensor_from_proto(response.outputs[0]), expected)
    audit = await registry_stub.ListAuditEntries(
        reg.ListAuditEntriesRequest(model=MODEL, method="UploadModelVersion")
    )
    messages = [entry.message for entry in audit.entries]
    assert any("signed by key " in m for m in messages) and any("signed by CN=ml-team" in m for m in messages)


async def test_unsigned_foreign_and_tampered_uploads_are_refused(
    registry: RegistryApp, registry_stub: Any, signers: dict[str, Any], tmp_path: Path
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL, require_signature=True))
    data = torchscript_archive()
    tampered = data[:-30] + bytes(30)  # the same archive with its tail changed
    cases = {
        "unsigned": (data, b""),
        "foreign key": (data, _sign(signers["foreign_key"], data, tmp_path)),
        "foreign CA": (data, _sign(signers["foreign_cert"], data, tmp_path)),
        "tampered": (tampered, _sign(signers["key"], data, tmp_path)),
        "garbage": (data, b"{not a bundle"),
    }
    for case, (artifact, bundle) in cases.items():
        err = await failure(upload(registry_stub, artifact, TORCHSCRIPT, extra={"model_signature": bundle}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.details())
        assert error_info(err).reason == "MODEL_SIGNATURE_INVALID", (case, err.details())
        assert bad_fields(err) == ["metadata.model_signature"], case
        assert stored_artifacts(registry) == set(), case
    # A model that does not require signatures still refuses a signature that does not verify.
    await registry_stub.CreateModel(reg.CreateModelRequest(name="open"))
    err = await failure(
        upload(
            registry_stub, data, TORCHSCRIPT, model="open", extra={"model_signature": cases["foreign key"][1]}
        )
    )
    assert error_info(err).reason == "MODEL_SIGNATURE_INVALID"
    assert await upload(registry_stub, data, TORCHSCRIPT, model="open") == 1  # unsigned: accepted
    audit = await registry_stub.ListAuditEntries(reg.ListAuditEntriesRequest(model=MODEL))
    assert {e.error_reason for e in audit.entries if e.method == "UploadModelVersion"} == {
        "MODEL_SIGNATURE_INVALID"
    }


def _set_signature(registry: RegistryApp, version: int, bundle: bytes) -> None:
    with contextlib.closing(sqlite3.connect(registry.settings.resolved_database_path)) as db, db:
        db.execute(
            "UPDATE versions SET model_signature = ? WHERE model = ? AND version = ?",
            (bundle, MODEL, version),
        )


async def test_tampered_foreign_signed_and_unsigned_artifacts_planted_in_the_store_are_refused_at_load(
    registry: RegistryApp, registry_stub: Any, stub: Any, signers: dict[str, Any], tmp_path: Path
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL, require_signature=True))
    good = torchscript_archive()
    bundle = _sign(signers["key"], good, tmp_path)
    marker = tmp_path / "marker"
    evil = CORPUS["torchscript: data.pkl"].build(marker)
    other = export_archive()

    async def planted(data: bytes, fmt: int, signature: bytes) -> str:
        version = await upload(registry_stub, good, TORCHSCRIPT, extra={"model_signature": bundle})
        plant(registry, MODEL, version, data, fmt)
        _set_signature(registry, version, signature)
        await registry_stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="production", version=version))
        held = await wait_for_version(stub, MODEL, version, ms.VERSION_STATE_FAILED)
        assert "refusing to load it" in held.error
        return str(held.error)

    # Tampered: other bytes (a payload, even) under the genuine signature of the good ones.
    assert "signs other bytes" in await planted(evil, TORCHSCRIPT, bundle)
    # Foreign-signed: a valid signature of the planted bytes, by a key the cluster does not trust.
    assert "trusted key" in await planted(other, TORCH_EXPORT, _sign(signers["foreign_key"], other, tmp_path))
    # Unsigned, though the model requires a signature.
    assert "requires a model signature" in await planted(other, TORCH_EXPORT, b"")
    assert not marker.exists()

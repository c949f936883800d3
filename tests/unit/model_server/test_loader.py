"""Artifact verification and deserialisation: sha256 first, only non-pickle formats."""

from __future__ import annotations

import io

import pytest
import torch

from model_server.loader import load_module, verify_artifact
from modelyard.errors import ArtifactCorrupt, FailedPrecondition, UnsafeArtifact
from modelyard.v1 import registry_pb2
from tests.unit.model_server.model_artifacts import export_bytes, make_artifact, mlp, torchscript_bytes

UNPICKLED: list[str] = []


def _record_unpickling() -> list[str]:
    UNPICKLED.append("code ran")
    return UNPICKLED


class Booby:
    """Unpickling this runs code: what a loader must never do with an artifact."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_record_unpickling, ())


def test_a_matching_sha256_passes_and_any_other_is_corrupt() -> None:
    data = torchscript_bytes(mlp())
    verify_artifact(make_artifact(data))
    verify_artifact(make_artifact(data, sha256=make_artifact(data).sha256.upper()))
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        verify_artifact(make_artifact(data, sha256="0" * 64))


def test_the_sha256_is_checked_before_anything_is_deserialised() -> None:
    buffer = io.BytesIO()
    torch.save({"payload": Booby()}, buffer)
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        load_module(make_artifact(buffer.getvalue(), sha256="0" * 64), "cpu")
    assert UNPICKLED == []


def test_a_pickle_declared_as_torchscript_is_refused_without_running_it() -> None:
    buffer = io.BytesIO()
    torch.save({"payload": Booby()}, buffer)
    with pytest.raises(UnsafeArtifact, match="refusing to load it: the artifact is not a TorchScript"):
        load_module(make_artifact(buffer.getvalue()), "cpu")
    assert UNPICKLED == []


def test_garbage_and_unknown_formats_are_refused() -> None:
    with pytest.raises(UnsafeArtifact, match="not a zip archive"):
        load_module(make_artifact(b"not a zip at all"), "cpu")
    with pytest.raises(FailedPrecondition, match="format"):
        load_module(make_artifact(b"x", format=registry_pb2.ARTIFACT_FORMAT_UNSPECIFIED), "cpu")


def test_both_formats_load_into_a_module_equal_to_the_original() -> None:
    x = torch.randn(3, 4)
    with torch.inference_mode():
        expected = mlp()(x)
        scripted = load_module(make_artifact(torchscript_bytes(mlp())), "cpu")
        assert not scripted.training
        torch.testing.assert_close(scripted(x), expected)
        exported = load_module(
            make_artifact(
                export_bytes(mlp(), torch.zeros(2, 4)), format=registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT
            ),
            "cpu",
        )
        torch.testing.assert_close(exported(x), expected)

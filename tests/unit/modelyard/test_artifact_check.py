"""The static archive inspector on real archives and on the malicious corpus: every attack is
refused naming its member, without running its payload; real archives pass; and the loaders
the model server uses never run a payload even when handed one directly."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from modelyard.artifact_check import ArchiveKind, ArchiveLimits, check_sympy_expression, inspect_archive
from modelyard.errors import UnsafeArtifact
from tests.artifact_corpus import (
    CORPUS,
    TORCHSCRIPT,
    Attack,
    evil_pickle,
    export_archive,
    replace_members,
    torchscript_archive,
)

KIND = {TORCHSCRIPT: ArchiveKind.TORCHSCRIPT}


def _kind(attack: Attack) -> ArchiveKind:
    return KIND.get(attack.format, ArchiveKind.TORCH_EXPORT)


def test_real_archives_pass() -> None:
    inspect_archive(torchscript_archive(), ArchiveKind.TORCHSCRIPT)
    inspect_archive(export_archive(), ArchiveKind.TORCH_EXPORT)


def test_a_program_with_symbolic_arithmetic_passes() -> None:
    class Reshape(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=0).reshape(-1, 2).sum(dim=1)

    batch = torch.export.Dim("batch", min=2, max=512)
    program = torch.export.export(Reshape(), (torch.randn(4, 4),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    inspect_archive(buffer.getvalue(), ArchiveKind.TORCH_EXPORT)


def test_traced_and_quantized_torchscript_pass() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 4)), buffer)  # traced_inputs.pkl
    inspect_archive(buffer.getvalue(), ArchiveKind.TORCHSCRIPT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(quantized), buffer)  # torch's own torchbind packed params
    inspect_archive(buffer.getvalue(), ArchiveKind.TORCHSCRIPT)


def test_the_wrong_format_is_refused_naming_metadata_format() -> None:
    with pytest.raises(UnsafeArtifact) as caught:
        inspect_archive(export_archive(), ArchiveKind.TORCHSCRIPT)
    assert caught.value.field == "metadata.format"
    with pytest.raises(UnsafeArtifact) as caught:
        inspect_archive(b"not a zip", ArchiveKind.TORCH_EXPORT)
    assert caught.value.field == "metadata.format"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_attack_is_refused_naming_its_member(name: str, tmp_path: Path) -> None:
    attack = CORPUS[name]
    marker = tmp_path / "marker"
    data = attack.build(marker)
    with pytest.raises(UnsafeArtifact) as caught:
        inspect_archive(data, _kind(attack))
    error = caught.value
    assert error.reason == "UNSAFE_ARTIFACT"
    assert attack.member in error.message and attack.member in error.metadata["member"] + error.message
    assert len(error.message) <= 1000
    assert not marker.exists()


def test_limits_are_settings() -> None:
    with pytest.raises(UnsafeArtifact, match="members"):
        inspect_archive(torchscript_archive(), ArchiveKind.TORCHSCRIPT, ArchiveLimits(max_members=3))
    with pytest.raises(UnsafeArtifact, match="unpacked bytes"):
        inspect_archive(torchscript_archive(), ArchiveKind.TORCHSCRIPT, ArchiveLimits(max_total_bytes=100))


def test_a_local_header_that_disagrees_with_the_directory_is_refused() -> None:
    data = bytearray(torchscript_archive())
    # Rename the first member in its local header only (the central directory keeps the name).
    offset = data.index(b"archive/")
    data[offset : offset + 7] = b"archivf"
    with pytest.raises(UnsafeArtifact, match="local header"):
        inspect_archive(bytes(data), ArchiveKind.TORCHSCRIPT)


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s77', positive=True, integer=True)",
        "2*s77 + 1",
        "Max(1, s77)",
        "FloorDiv(s77, 2)",
        "Eq(Mod(s77, 2), 0)",
        "s77**2",
        "-s1 + s0 >= 3",
    ],
)
def test_symbolic_expressions_torch_writes_pass(text: str) -> None:
    check_sympy_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('id')",
        "s77.__class__",
        "(lambda: 1)()",
        "exec('1')",
        "Symbol('a b')",
        "2**2**99999",
        "[1][0]",
        "Max(open, s0)",
        "Float(exec)",
    ],
)
def test_symbolic_expressions_that_could_run_code_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        check_sympy_expression(text)


def test_torchscript_loader_refuses_a_foreign_global_without_running_it(tmp_path: Path) -> None:
    # Defence in depth under the inspector: TorchScript's own unpickler resolves only tensor
    # and TorchScript types, so a replaced data.pkl / constants.pkl fails to load, inertly.
    marker = tmp_path / "marker"
    for member in ("data.pkl", "constants.pkl"):
        data = replace_members(torchscript_archive(), {member: evil_pickle(marker)})
        with pytest.raises(RuntimeError, match="Unknown type name"):
            torch.jit.load(io.BytesIO(data))  # type: ignore[no-untyped-call]
        assert not marker.exists()


def test_export_loader_never_unpickles(tmp_path: Path) -> None:
    # The model server's torch.export loader builds weights from raw payloads and skips the
    # sample inputs, so even an archive that slipped past the inspector cannot run its pickles.
    from model_server.loader import load_exported_program

    marker = tmp_path / "marker"
    for name in (
        "export: pickled sample inputs",
        "export: weight marked use_pickle",
        "export: opaque constant",
    ):
        data = CORPUS[name].build(marker)
        try:
            load_exported_program(data)
        except Exception:  # noqa: BLE001 - refusing is fine; running the payload is not
            pass
        assert not marker.exists(), name
    program = load_exported_program(export_archive())
    reference = torch.export.load(io.BytesIO(export_archive()))
    x = torch.randn(3, 4)
    assert torch.equal(program.module()(x), reference.module()(x))


def test_the_corpus_payloads_are_live(tmp_path: Path) -> None:
    # The refusals above prove something only if these archives would run their payload under
    # torch's own pt2 loader; check one of each kind here (in a child process: it does run).
    import subprocess
    import sys

    for name in ("export: pickled sample inputs", "export: sympy expression eval"):
        marker = tmp_path / name.replace(" ", "_").replace(":", "")
        path = tmp_path / "attack.pt2"
        path.write_bytes(CORPUS[name].build(marker))
        code = f"import torch\ntry: torch.export.load({str(path)!r})\nexcept Exception: pass"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
        assert marker.exists(), name
    assert zipfile.is_zipfile(path)


def test_torchscript_code_that_writes_a_file_is_live_and_refused(tmp_path: Path) -> None:
    # TorchScript is not Python, yet torch.save in its code writes a file at the first forward
    # (a model server's warm-up); so its code is inspected too.
    marker = tmp_path / "marker"
    data = CORPUS["torchscript: torch.save in code"].build(marker)
    with pytest.raises(UnsafeArtifact, match="calls save"):
        inspect_archive(data, ArchiveKind.TORCHSCRIPT)
    assert not marker.exists()
    torch.jit.load(io.BytesIO(data))(torch.randn(1, 4))  # type: ignore[no-untyped-call]
    assert marker.exists()

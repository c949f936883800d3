"""The upload-time check of an artifact: the kernel's static inspection, for the stated format.

`modelyard.artifact_check` holds the one allow-list (the model server repeats the same
inspection before every load): zip member names, the archive's JSON and each pickle's opcodes
are read, nothing is unpickled or executed. A plain `torch.save` pickle is refused, as is any
part that loading would unpickle, an opaque object, code, a path outside the archive, or a zip
bomb. The model server loads and warms the version and is where a broken program is found.
"""

from __future__ import annotations

from pathlib import Path

from modelyard.artifact_check import ArchiveKind, inspect_archive
from modelyard.errors import UnsafeArtifact
from registry_service.records import ArtifactFormat

__all__ = ["check_archive", "ARCHIVE_KIND"]

ARCHIVE_KIND: dict[ArtifactFormat, ArchiveKind] = {
    ArtifactFormat.TORCHSCRIPT: ArchiveKind.TORCHSCRIPT,
    ArtifactFormat.TORCH_EXPORT: ArchiveKind.TORCH_EXPORT,
}


def check_archive(path: Path, fmt: ArtifactFormat) -> None:
    """Inspect the file at `path` as an archive of `fmt` (blocking: call off the loop).

    Raises:
        UnsafeArtifact: (INVALID_ARGUMENT) naming the member at fault in its message and in
            ErrorInfo metadata `member`; the field is `metadata.format` when the file is not an
            archive of `fmt` at all, else `chunk`.
    """
    try:
        inspect_archive(path, ARCHIVE_KIND[fmt])
    except UnsafeArtifact as exc:
        raise UnsafeArtifact(
            f"{exc.message}; nothing was stored", field=exc.field, metadata=exc.metadata
        ) from None

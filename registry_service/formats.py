"""What an artifact of each format looks like, checked at upload before the artifact is kept.

Both formats are zip archives with one top-level folder. A TorchScript archive holds `code/`
(the compiled program); a torch.export archive holds `archive_format` and `models/`. A plain
`torch.save` pickle is a zip too, but has neither, and is refused: loading it runs arbitrary
code. This is a cheap sniff of the archive's table of contents, not a load: the model server
loads and warms the version and is where a broken program is found.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

from modelyard.errors import InvalidArgument
from registry_service.records import ArtifactFormat

__all__ = ["check_archive"]


def _is_torchscript(entries: list[list[str]]) -> bool:
    return any(len(parts) > 2 and parts[1] == "code" for parts in entries)


def _is_torch_export(entries: list[list[str]]) -> bool:
    return any(len(parts) >= 2 and parts[1] in ("archive_format", "models") for parts in entries)


_CHECKS: dict[ArtifactFormat, tuple[Callable[[list[list[str]]], bool], str]] = {
    ArtifactFormat.TORCHSCRIPT: (_is_torchscript, "a TorchScript archive (torch.jit.save)"),
    ArtifactFormat.TORCH_EXPORT: (_is_torch_export, "a torch.export archive (torch.export.save)"),
}


def check_archive(path: Path, fmt: ArtifactFormat) -> None:
    """Check that the file at `path` looks like an archive of `fmt` (blocking: call off the loop).

    Raises:
        InvalidArgument: naming `metadata.format`, when it does not.
    """
    looks_right, described = _CHECKS[fmt]
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [name.split("/") for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        entries = []
    if not looks_right(entries):
        raise InvalidArgument(
            f"the artifact is not {described} as metadata.format says; pickles written by "
            "torch.save are not accepted because loading them runs arbitrary code",
            field="metadata.format",
        )

"""A corpus of malicious model archives, built from real TorchScript and torch.export artifacts.

Each entry takes a real archive and replaces or adds one part the way an attacker would. The
pickles' `__reduce__` writes a marker file, so a test proves nothing ran by checking that the
marker is absent after the refusal. Used by the unit tests of the inspector and loader and by
the registry / model server integration tests (upload, and planted in the store).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelyard.v1 import registry_pb2

TORCHSCRIPT = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
TORCH_EXPORT = registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT


class Payload:
    """Unpickling this writes `marker` (with the pid of the process that unpickled it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, ...]]:
        return (os.system, (f"echo $$ > {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=2)


def evil_torch_save(marker: Path) -> bytes:
    """A torch.save zip whose data.pkl is the payload (what `torch.load(weights_only=False)`
    of a pickled weight or sample input would run)."""
    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buffer)
    return replace_members(buffer.getvalue(), {"data.pkl": evil_pickle(marker)})


class TinyNet(torch.nn.Module):
    """4 -> 3 with a buffer and a constant tensor attribute, so that a torch.export archive
    holds weights, buffers and constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("offset", torch.ones(3))
        self.scale = torch.tensor([1.0, 2.0, 3.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) + self.offset) * self.scale


def torchscript_archive() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyNet().eval()), buffer)
    return buffer.getvalue()


def export_archive() -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(TinyNet().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _root(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].split("/", 1)[0]


def replace_members(
    data: bytes,
    replaced: dict[str, bytes],
    *,
    added: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
) -> bytes:
    """A copy of the zip `data` with members (paths below its top folder) replaced, added or
    dropped, written the way torch writes (stored)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    root = _root(source)
    missing = set(replaced) - {info.filename.split("/", 1)[1] for info in source.infolist()}
    assert not missing, f"no such members to replace: {missing}"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            rest = info.filename.split("/", 1)[1]
            if rest in drop:
                continue
            target.writestr(info.filename, replaced.get(rest, source.read(info.filename)))
        for rest, content in (added or {}).items():
            target.writestr(f"{root}/{rest}", content)
    return out.getvalue()


def edit_json(data: bytes, member: str, edit: Callable[[dict], None]) -> bytes:  # type: ignore[type-arg]
    archive = zipfile.ZipFile(io.BytesIO(data))
    document = json.loads(archive.read(f"{_root(archive)}/{member}"))
    edit(document)
    return replace_members(data, {member: json.dumps(document).encode()})


# -- the attacks ----------------------------------------------------------------------------------


def _export_use_pickle_weight(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["config"]["linear.weight"]["use_pickle"] = True

    data = edit_json(data, "data/weights/model_weights_config.json", edit)
    path = json.loads(
        zipfile.ZipFile(io.BytesIO(data)).read("archive/data/weights/model_weights_config.json")
    )["config"]["linear.weight"]["path_name"]
    return replace_members(data, {f"data/weights/{path}": evil_torch_save(marker)})


def _export_opaque_constant(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["config"]["scale"]["path_name"] = "opaque_obj_0"
        doc["config"]["scale"]["use_pickle"] = True

    data = edit_json(data, "data/constants/model_constants_config.json", edit)
    return replace_members(data, {}, added={"data/constants/opaque_obj_0": evil_pickle(marker)})


def _export_pickled_constant(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["config"]["scale"]["use_pickle"] = True

    data = edit_json(data, "data/constants/model_constants_config.json", edit)
    return replace_members(data, {"data/constants/tensor_0": evil_torch_save(marker)})


def _export_sample_inputs(marker: Path) -> bytes:
    return replace_members(export_archive(), {"data/sample_inputs/model.pt": evil_torch_save(marker)})


def _export_legacy_weights(marker: Path) -> bytes:
    return replace_members(export_archive(), {}, added={"data/weights/model.pt": evil_pickle(marker)})


def _export_sympy_eval(marker: Path) -> bytes:
    """torch's deserializer hands every `expr_str` to sympy.sympify, which evals it."""
    data = export_archive()
    archive = zipfile.ZipFile(io.BytesIO(data))
    text = archive.read("archive/models/model.json").decode()
    start = text.index("Symbol(")
    end = text.index(")", start) + 1
    evil = f"__import__('os').system('echo $$ > {marker}') or {text[start:end]}"
    return replace_members(data, {"models/model.json": text.replace(text[start:end], evil, 1).encode()})


def _export_torchbind(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"name": "obj", "class_fqn": "x.y"}}

    return edit_json(data, "models/model.json", edit)


def _export_foreign_op(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.save"

    return edit_json(data, "models/model.json", edit)


def _export_aoti(marker: Path) -> bytes:
    return replace_members(export_archive(), {}, added={"data/aotinductor/model/model.so": b"\x7fELF"})


def _torchscript_data_pkl(marker: Path) -> bytes:
    return replace_members(torchscript_archive(), {"data.pkl": evil_pickle(marker)})


def _torchscript_constants_pkl(marker: Path) -> bytes:
    return replace_members(torchscript_archive(), {"constants.pkl": evil_pickle(marker)})


def _torchscript_debug_pkl(marker: Path) -> bytes:
    data = torchscript_archive()
    # Any debug pickle: their paths follow the scripted classes' (possibly mangled) names.
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    member = next(n for n in names if n.endswith(".py.debug_pkl")).split("/", 1)[1]
    return replace_members(data, {member: evil_pickle(marker)})


def _torchscript_torchbind(marker: Path) -> bytes:
    # A GLOBAL naming a torchbind class: an opaque C++ object TorchScript would construct.
    evil = b"\x80\x02c__torch__.torch.classes.evil\nThing\n)\x81."
    return replace_members(torchscript_archive(), {"constants.pkl": evil})


def _torchscript_code(call: str) -> Callable[[Path], bytes]:
    """TorchScript whose forward calls `call` (with the marker's path) first: it would run at the
    model server's warm-up."""

    def build(marker: Path) -> bytes:
        data = torchscript_archive()
        archive = zipfile.ZipFile(io.BytesIO(data))
        member = next(
            n for n in archive.namelist() if n.endswith(".py") and b"class TinyNet" in archive.read(n)
        )
        text = archive.read(member).decode()
        head, sep, body = text.partition("    x: Tensor) -> Tensor:\n")
        assert sep, text
        injected = f"{head}{sep}    {call.format(marker=marker)}\n{body}"
        return replace_members(data, {member.split("/", 1)[1]: injected.encode()})

    return build


def _export_save_node(marker: Path) -> bytes:
    data = export_archive()

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.save.default"

    return edit_json(data, "models/model.json", edit)


def _torch_save(marker: Path) -> bytes:
    """A plain torch.save pickle (declared as either format)."""
    return evil_torch_save(marker)


def _zip_with(name: str, *, link: bool = False, base: bytes | None = None) -> bytes:
    data = base if base is not None else torchscript_archive()
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as archive:
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
        else:
            archive.writestr(info, b"x")
    return out.getvalue()


def _zip_slip(marker: Path) -> bytes:
    return _zip_with("archive/../../../tmp/evil.py")


def _absolute(marker: Path) -> bytes:
    return _zip_with("/tmp/evil.py")


def _symlink(marker: Path) -> bytes:
    return _zip_with("archive/extra/passwd", link=True)


def _bomb_ratio(marker: Path) -> bytes:
    out = io.BytesIO(torchscript_archive())
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/extra/bomb", b"\0" * (64 * 1024 * 1024))
    return out.getvalue()


def _bomb_members(marker: Path) -> bytes:
    out = io.BytesIO(torchscript_archive())
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as archive:
        for i in range(10_001):
            archive.writestr(f"archive/extra/{i}", b"")
    return out.getvalue()


@dataclass(frozen=True)
class Attack:
    """One malicious archive: how to build it, the format it is declared as, and a word of the
    member its refusal must name."""

    build: Callable[[Path], bytes]
    format: int
    member: str
    pickles: bool = True
    """Whether it carries a payload (a marker would appear if it ran)."""


CORPUS: dict[str, Attack] = {
    "export: weight marked use_pickle": Attack(_export_use_pickle_weight, TORCH_EXPORT, "weights_config"),
    "export: opaque constant": Attack(_export_opaque_constant, TORCH_EXPORT, "constants_config"),
    "export: pickled tensor constant": Attack(_export_pickled_constant, TORCH_EXPORT, "constants_config"),
    "export: pickled sample inputs": Attack(_export_sample_inputs, TORCH_EXPORT, "sample_inputs"),
    "export: legacy pickled weights": Attack(_export_legacy_weights, TORCH_EXPORT, "weights/model.pt"),
    "export: sympy expression eval": Attack(_export_sympy_eval, TORCH_EXPORT, "model.json"),
    "export: torchbind object": Attack(_export_torchbind, TORCH_EXPORT, "model.json", pickles=False),
    "export: call of a non-operator": Attack(_export_foreign_op, TORCH_EXPORT, "model.json", pickles=False),
    "export: AOTInductor code": Attack(_export_aoti, TORCH_EXPORT, "aotinductor", pickles=False),
    "export: aten.save node": Attack(_export_save_node, TORCH_EXPORT, "model.json", pickles=False),
    "torchscript: torch.save in code": Attack(
        _torchscript_code('torch.save(x, "{marker}")'), TORCHSCRIPT, "code/__torch__"
    ),
    "torchscript: from_file in code": Attack(
        _torchscript_code('_f = torch.from_file("{marker}")'), TORCHSCRIPT, "code/__torch__", pickles=False
    ),
    "torchscript: foreign operator namespace": Attack(
        _torchscript_code("_c = ops.c10d.barrier()"), TORCHSCRIPT, "code/__torch__", pickles=False
    ),
    "torchscript: data.pkl": Attack(_torchscript_data_pkl, TORCHSCRIPT, "data.pkl"),
    "torchscript: constants.pkl": Attack(_torchscript_constants_pkl, TORCHSCRIPT, "constants.pkl"),
    "torchscript: debug pickle": Attack(_torchscript_debug_pkl, TORCHSCRIPT, "debug_pkl"),
    "torchscript: torchbind class": Attack(
        _torchscript_torchbind, TORCHSCRIPT, "constants.pkl", pickles=False
    ),
    "torch.save as torchscript": Attack(_torch_save, TORCHSCRIPT, ""),
    "torch.save as torch_export": Attack(_torch_save, TORCH_EXPORT, "archive_format"),
    "zip slip": Attack(_zip_slip, TORCHSCRIPT, "..", pickles=False),
    "absolute path": Attack(_absolute, TORCHSCRIPT, "/tmp/evil.py", pickles=False),
    "symlink member": Attack(_symlink, TORCHSCRIPT, "passwd", pickles=False),
    "zip bomb (ratio)": Attack(_bomb_ratio, TORCHSCRIPT, "bomb", pickles=False),
    "zip bomb (members)": Attack(_bomb_members, TORCHSCRIPT, "", pickles=False),
}
"""Every attack, by name."""

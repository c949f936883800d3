"""Static inspection of an uploaded model archive: nothing is unpickled, imported or executed.

The registry runs it on every upload and the model server again before every load, so there is
one allow-list for both. An archive passes only if every member is something its format must
or may contain, in the form PyTorch itself writes it:

- **The zip itself**: one top-level folder; plain files only (no symlink, directory or device
  entries); relative names without `..`, `.`, empty parts, backslashes, drive letters or NUL;
  no duplicate names; each member's local header agrees with the central directory; stored or
  deflated, not encrypted; member count, total uncompressed size and compression ratio under
  `ArchiveLimits` (zip bombs).
- **Pickles** (TorchScript's `data.pkl`, `constants.pkl`, `traced_inputs.pkl`, `*.debug_pkl`; a torch.export
  archive's sample inputs): the opcode stream is read with `pickletools.genops`, and every
  global it names must be one PyTorch's own formats use (tensor rebuilding, storages,
  `collections.OrderedDict`, TorchScript's `__torch__` classes). Torchbind classes
  (`__torch__.torch.classes.*`) are opaque C++ objects and are refused, except the packed
  weights of torch's own quantized modules (`__torch__.torch.classes.quantized.*PackedParamsBase`).
- **torch.export (`.pt2`)**: the weights and constants configs must declare raw tensor
  payloads only (`use_pickle` false, `weight_N` / `tensor_N` files that exist); custom (torchbind)
  and opaque (pickled Python) constants, legacy pickled weights (`data/weights/<model>.pt`),
  AOTInductor code and other payloads are refused. In the exported program's JSON every node
  target must be an ATen / prims / allowed higher-order operator or a symbolic-shape helper, no
  custom object may appear, and every symbolic expression (`expr_str`, which torch's deserializer
  hands to `sympy.sympify`, that is to `eval`) must be a plain arithmetic expression over symbols.

Errors name the member at fault (`UnsafeArtifact`, INVALID_ARGUMENT with reason UNSAFE_ARTIFACT).
No torch import here: the registry does not need torch to refuse an archive.
"""

from __future__ import annotations

import ast
import enum
import io
import json
import pickletools
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from modelyard.errors import UnsafeArtifact

__all__ = ["ArchiveKind", "ArchiveLimits", "inspect_archive", "check_sympy_expression"]


class ArchiveKind(enum.Enum):
    """The archive formats Modelyard accepts."""

    TORCHSCRIPT = "torchscript"
    """torch.jit.save"""
    TORCH_EXPORT = "torch_export"
    """torch.export.save (.pt2)"""


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Bounds on what an archive may unpack to (zip bombs) and on the parts read to inspect it."""

    max_members: int = 10_000
    """Most members (files) an archive may hold."""
    max_total_bytes: int = 16 * 1024**3
    """Most bytes all members may unpack to together."""
    max_compression_ratio: float = 100.0
    """Highest uncompressed / compressed size of one compressed member over 1 MiB. PyTorch
    stores tensor data uncompressed; text compresses well under this."""
    max_inspected_bytes: int = 256 * 1024**2
    """Largest member that is read to inspect it (a pickle, a JSON document)."""


DEFAULT_LIMITS = ArchiveLimits()

_FORMAT_FIELD = "metadata.format"
"""The field named when an archive is not of the declared format at all (else "chunk")."""
_MAX_NAME_CHARS = 1024
_MAX_SHOWN_CHARS = 160
_RATIO_FLOOR_BYTES = 1024 * 1024
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})

# -- pickles ------------------------------------------------------------------------------------

# Globals that PyTorch's own tensor pickles name (torch.save of tensors and containers, and
# TorchScript's data.pkl / constants.pkl / debug pickles).
_TENSOR_GLOBALS = frozenset(
    {
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        "torch._utils _rebuild_qtensor",
        "collections OrderedDict",
        "torch device",
        "torch Size",
        "torch.jit._pickle build_intlist",
        "torch.jit._pickle build_doublelist",
        "torch.jit._pickle build_boollist",
        "torch.jit._pickle build_tensorlist",
        "torch.jit._pickle build_tensor_from_id",
        "torch.jit._pickle restore_type_tag",
    }
)
_STORAGE_GLOBAL = re.compile(r"torch [A-Z][A-Za-z0-9]*Storage")
# Constants a quantized tensor's rebuild names: its quantization scheme and dtypes.
_TORCH_CONSTANT_GLOBAL = re.compile(
    r"torch (per_tensor_affine|per_channel_affine|per_tensor_symmetric|per_channel_symmetric"
    r"|per_channel_affine_float_qparams|q?u?int[0-9]+|quint4x2|quint2x4|float[0-9]*|bfloat16|bool)"
)
# TorchScript module and class types; the script's own classes live under `__torch__`.
_TORCHSCRIPT_CLASS = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)* [A-Za-z_][A-Za-z0-9_]*")
_TORCHBIND_PREFIX = "__torch__.torch.classes"
# The torchbind classes torch itself registers for quantized modules (their state is packed
# weights, rebuilt by torch's own C++); any other torchbind class is opaque and refused.
_TORCH_QUANTIZED_CLASS = re.compile(r"__torch__\.torch\.classes\.quantized [A-Za-z0-9]*PackedParamsBase")
# Opcodes that build objects from classes without going through a checked GLOBAL.
_REFUSED_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_MEMO_OPCODES = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"})

# -- torch.export -------------------------------------------------------------------------------

_EXPORT_TARGET = re.compile(
    r"torch\.ops\.(aten|prims)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*"
    r"|_operator\.[a-z_]+"
    r"|math\.[a-z_]+"
    r"|torch\.sym_[a-z_]+|torch\._sym_sqrt"
)
_EXPORT_FILE_OPS = re.compile(r"torch\.ops\.aten\.(save|from_file)\.")
_HIGHER_ORDER_OPS = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "invoke_subgraph",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)
_CUSTOM_OBJECT_KEYS = frozenset({"as_custom_obj", "custom_obj", "as_opaque_obj", "opaque_obj"})
_MODEL_JSON = re.compile(r"models/([A-Za-z0-9_]+)\.json")

# Names torch's exported-program deserializer gives sympy (its `sympy_functions`) and the sympy
# constructors `str(expr)` / `srepr(expr)` write.
_SYMPY_CALLS = frozenset(
    {
        "Symbol",
        "Integer",
        "Add",
        "Mul",
        "Pow",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Piecewise",
        "ExprCondPair",
        "Float",
        "Rational",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "floor",
        "ceiling",
        "sqrt",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
_SYMPY_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.And,
    ast.Or,
    ast.BitAnd,
    ast.BitOr,
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# The symbols torch's shape environment creates (s0, u3, zuf1, ...), and sympy's constants.
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]+")
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "pi", "E", "I"})
_MAX_EXPRESSION_CHARS = 4096
_MAX_EXPONENT = 64
_MAX_INT_DIGITS = 40


def inspect_archive(
    source: Path | IO[bytes] | bytes, kind: ArchiveKind, limits: ArchiveLimits = DEFAULT_LIMITS
) -> None:
    """Check an archive of `kind` without executing any of it (blocking: call off the loop).

    Args:
        source: The archive: a path, a seekable binary file, or its bytes.
        kind: The format it claims to be.
        limits: Bounds on members, sizes and compression ratio.

    Raises:
        UnsafeArtifact: naming the member at fault (metadata `member`), or the whole archive.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _refuse(
            "",
            f"is not a zip archive, so it is not {_described(kind)}; pickles written by "
            "torch.save are not accepted because loading them runs arbitrary code",
            field=_FORMAT_FIELD,
        ) from None
    with archive:
        root, members = _check_zip(archive, limits)
        if kind is ArchiveKind.TORCHSCRIPT:
            _check_torchscript(archive, root, members, limits)
        else:
            _check_torch_export(archive, root, members, limits)


def check_sympy_expression(text: str) -> None:
    """Check that `text` is a plain arithmetic / comparison expression over symbols, in the form
    `str()` of a sympy expression takes, so that `sympy.sympify(text)` cannot run code.

    Raises:
        ValueError: saying what is not allowed.
    """
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise ValueError("not an arithmetic expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            raise ValueError(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                raise ValueError("calls only sympy's arithmetic functions")
        elif isinstance(node, ast.Name):
            called = node.id in _SYMPY_CALLS
            if not (called or _SYMBOL_NAME.fullmatch(node.id) or node.id in _SYMPY_CONSTANTS):
                raise ValueError(f"name {node.id[:40]!r} is not a shape symbol")
        elif isinstance(node, ast.keyword):
            if node.arg is None or _IDENTIFIER.fullmatch(node.arg) is None:
                raise ValueError("keyword arguments must be plain names")
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and _IDENTIFIER.fullmatch(value) is None:
                raise ValueError("strings must be plain symbol names")
            if isinstance(value, int) and len(str(abs(value))) > _MAX_INT_DIGITS:
                raise ValueError("integer too large")
            if not isinstance(value, str | int | float | bool | type(None)):
                raise ValueError("constants must be numbers, booleans or names")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exponent = node.right
            if not (
                isinstance(exponent, ast.Name)
                or (
                    isinstance(exponent, ast.Constant)
                    and isinstance(exponent.value, int | float)
                    and abs(exponent.value) <= _MAX_EXPONENT
                )
            ):
                raise ValueError(f"exponents must be symbols or numbers up to {_MAX_EXPONENT}")


# -- the zip ------------------------------------------------------------------------------------


def _check_zip(archive: zipfile.ZipFile, limits: ArchiveLimits) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The common checks; returns the top-level folder and the members by path below it."""
    infos = archive.infolist()
    if not infos:
        raise _refuse("", "is an empty archive")
    if len(infos) > limits.max_members:
        raise _refuse("", f"has {len(infos)} members, more than the limit of {limits.max_members}")
    total = 0
    root: str | None = None
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        _check_member_name(name)
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir() or file_type not in (0, stat.S_IFREG):
            kind = "a symbolic link" if file_type == stat.S_IFLNK else "not a regular file"
            raise _refuse(name, f"is {kind}; an archive may hold plain files only")
        if info.flag_bits & 0x1:
            raise _refuse(name, "is encrypted")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise _refuse(name, "uses a compression method other than stored or deflated")
        if info.file_size > 0 and info.compress_size == 0 and info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(name, "claims to unpack from nothing")
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.file_size > _RATIO_FLOOR_BYTES
            and info.file_size > limits.max_compression_ratio * info.compress_size
        ):
            raise _refuse(
                name,
                f"unpacks {info.file_size / max(info.compress_size, 1):.0f} times larger than it "
                f"is stored, over the limit of {limits.max_compression_ratio:g} (a zip bomb?)",
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise _refuse(name, f"takes the archive past {limits.max_total_bytes} unpacked bytes")
        top, _, rest = name.partition("/")
        if not rest:
            raise _refuse(name, "is outside the archive's top-level folder")
        if root is None:
            root = top
        elif top != root:
            raise _refuse(name, f"is outside the archive's one top-level folder {root!r}")
        if rest in members:
            raise _refuse(name, "appears twice in the archive")
        members[rest] = info
    assert root is not None
    # The local header of each member must name the same file as the central directory, so
    # that every zip reader (torch's miniz included) sees the members inspected here.
    for info in infos:
        try:
            archive.open(info).close()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
            raise _refuse(info.filename, "has a local header that disagrees with the directory") from None
    return root, members


def _check_member_name(name: str) -> None:
    if len(name) > _MAX_NAME_CHARS:
        raise _refuse(name, "has a name that is too long")
    if "\x00" in name or "\\" in name:
        raise _refuse(name, "has a NUL or a backslash in its name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise _refuse(name, "has an absolute path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _refuse(name, "has a path that leaves the archive or is not canonical ('..', '.', '//')")


# -- TorchScript --------------------------------------------------------------------------------

_TORCHSCRIPT_FILES = frozenset(
    {
        "data.pkl",
        "constants.pkl",
        "traced_inputs.pkl",
        "version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        ".format_version",
        ".storage_alignment",
    }
)
_TORCHSCRIPT_PATTERNS = (
    re.compile(r"data/[0-9]+"),
    re.compile(r"constants/[0-9]+"),
    re.compile(r"traced_inputs/[0-9]+"),
    re.compile(r"code/[A-Za-z0-9_./-]+\.py"),
    re.compile(r"code/[A-Za-z0-9_./-]+\.py\.debug_pkl"),
    re.compile(r"extra/[^/].*"),
)
_TORCHSCRIPT_PICKLES = ("data.pkl", "constants.pkl", "traced_inputs.pkl")
# TorchScript code is not Python, but some of what it can call touches the host: `torch.save`
# (aten::save) writes a file and `torch.from_file` reads one, at the first forward (the
# model server's warm-up). Operator namespaces other than these, and torchbind classes other
# than torch's quantized packed weights, are refused.
_TS_FILE_OPS = re.compile(r"\b(?:torch|aten)\s*\.\s*(save|from_file)\b")
_TS_OPS_NAMESPACE = re.compile(r"\bops\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*\.")
_TS_ALLOWED_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized"})
_TS_TORCHBIND = re.compile(r"\btorch\s*\.\s*classes\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")


def _check_torchscript(
    archive: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo], limits: ArchiveLimits
) -> None:
    if "data.pkl" not in members or not any(path.startswith("code/") for path in members):
        raise _refuse(
            "",
            f"is not {_described(ArchiveKind.TORCHSCRIPT)} (no data.pkl and code/); pickles "
            "written by torch.save are not accepted because loading them runs arbitrary code",
            field=_FORMAT_FIELD,
        )
    for path, info in members.items():
        if path not in _TORCHSCRIPT_FILES and not any(p.fullmatch(path) for p in _TORCHSCRIPT_PATTERNS):
            raise _refuse(info.filename, "is not a part of a TorchScript archive")
        if path in _TORCHSCRIPT_PICKLES or path.endswith(".debug_pkl"):
            _check_pickle(info.filename, _read(archive, info, limits), torchscript=True)
        elif path.startswith("code/"):
            _check_torchscript_code(info.filename, _read(archive, info, limits))


def _check_torchscript_code(member: str, data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(member, "is TorchScript code that is not UTF-8") from None
    if match := _TS_FILE_OPS.search(text):
        raise _refuse(
            member, f"is TorchScript code that calls {match.group(1)}, which touches the host's files"
        )
    for match in _TS_OPS_NAMESPACE.finditer(text):
        if match.group(1) not in _TS_ALLOWED_NAMESPACES:
            raise _refuse(member, f"is TorchScript code that calls operators of {match.group(1)[:40]!r}")
    for match in _TS_TORCHBIND.finditer(text):
        if match.group(1) != "quantized":
            raise _refuse(
                member, f"is TorchScript code that uses torchbind classes of {match.group(1)[:40]!r}"
            )


# -- torch.export -------------------------------------------------------------------------------

_EXPORT_FILES = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)


def _check_torch_export(
    archive: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo], limits: ArchiveLimits
) -> None:
    for required in ("archive_format", "archive_version", "models/model.json"):
        if required not in members:
            raise _refuse(
                f"{root}/{required}",
                f"is missing, so the artifact is not {_described(ArchiveKind.TORCH_EXPORT)}",
                field=_FORMAT_FIELD,
            )
    if _read(archive, members["archive_format"], limits).strip() != b"pt2":
        raise _refuse(members["archive_format"].filename, "does not say pt2")
    models = {m.group(1) for p in members if (m := _MODEL_JSON.fullmatch(p))}
    # What each model's configs reference; anything else under data/ is refused below.
    payloads: set[str] = set()
    for model in models:
        weights = f"data/weights/{model}_weights_config.json"
        constants = f"data/constants/{model}_constants_config.json"
        for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
            if legacy in members:
                raise _refuse(
                    members[legacy].filename,
                    "holds weights in the legacy pickled format, which loading would unpickle",
                )
        for config_path, directory, prefix in (
            (weights, "data/weights/", "weight_"),
            (constants, "data/constants/", "tensor_"),
        ):
            if config_path not in members:
                raise _refuse(f"{root}/{config_path}", "is missing")
            payloads |= _check_payload_config(archive, members, config_path, directory, prefix, limits)
        info = members[f"models/{model}.json"]
        _check_exported_program(info.filename, _json(archive, info, limits))
        sample = f"data/sample_inputs/{model}.pt"
        if sample in members:
            _check_tensor_archive(archive, members[sample], limits)
    for path, info in members.items():
        if path in _EXPORT_FILES or path in payloads or path.startswith("extra/"):
            continue
        if _MODEL_JSON.fullmatch(path):
            continue
        if re.fullmatch(r"data/weights/[A-Za-z0-9_]+_weights_config\.json", path) or re.fullmatch(
            r"data/constants/[A-Za-z0-9_]+_constants_config\.json", path
        ):
            continue
        if re.fullmatch(r"data/sample_inputs/[A-Za-z0-9_]+\.pt", path):
            continue
        if path.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
            raise _refuse(info.filename, "is a custom or opaque object, which loading would unpickle")
        if path.startswith("data/aotinductor/"):
            raise _refuse(info.filename, "is AOTInductor compiled code, which is not accepted")
        raise _refuse(info.filename, "is not a part of a torch.export archive that Modelyard accepts")


def _check_payload_config(
    archive: zipfile.ZipFile,
    members: dict[str, zipfile.ZipInfo],
    config_path: str,
    directory: str,
    prefix: str,
    limits: ArchiveLimits,
) -> set[str]:
    """Check a weights or constants config; return the payload members it references."""
    info = members[config_path]
    document = _json(archive, info, limits)
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise _refuse(info.filename, "is not a payload config ({'config': {...}})")
    referenced: set[str] = set()
    for fqn, entry in config.items():
        shown = str(fqn)[:80]
        if not isinstance(entry, dict):
            raise _refuse(info.filename, f"has a malformed entry for {shown!r}")
        if entry.get("use_pickle") is not False:
            raise _refuse(info.filename, f"marks {shown!r} use_pickle: loading it would unpickle it")
        path_name = entry.get("path_name")
        if not isinstance(path_name, str) or re.fullmatch(re.escape(prefix) + r"[0-9]+", path_name) is None:
            raise _refuse(
                info.filename,
                f"stores {shown!r} as {str(path_name)[:60]!r}, not as a raw tensor ({prefix}N)",
            )
        if not isinstance(entry.get("tensor_meta"), dict):
            raise _refuse(info.filename, f"has no tensor_meta for {shown!r}")
        member = directory + path_name
        if member not in members:
            raise _refuse(info.filename, f"references {member!r}, which is not in the archive")
        referenced.add(member)
    return referenced


def _check_exported_program(member: str, document: Any) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise _refuse(member, "is not a serialized exported program")
    for key, value in _walk(document):
        if key in _CUSTOM_OBJECT_KEYS and value not in (None, {}, [], ""):
            raise _refuse(member, f"uses a custom (torchbind) or opaque object ({key})")
        if key == "custom_obj_values" and value:
            raise _refuse(member, "declares custom (torchbind) objects")
        if key == "expr_str":
            if not isinstance(value, str):
                raise _refuse(member, "has a symbolic expression that is not a string")
            try:
                check_sympy_expression(value)
            except ValueError as exc:
                raise _refuse(
                    member, f"has a symbolic expression that is not plain arithmetic: {exc}"
                ) from None
        if key == "nodes" and isinstance(value, list):
            for node in value:
                target = node.get("target") if isinstance(node, dict) else None
                if not isinstance(target, str) or not _allowed_target(target):
                    raise _refuse(member, f"calls {str(target)[:80]!r}, which is not an allowed operator")


def _allowed_target(target: str) -> bool:
    if _EXPORT_FILE_OPS.match(target):
        return False  # aten::save writes a file, aten::from_file reads one
    if _EXPORT_TARGET.fullmatch(target):
        return True
    prefix = "torch.ops.higher_order."
    return target.startswith(prefix) and target[len(prefix) :] in _HIGHER_ORDER_OPS


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield str(key), child
                if isinstance(child, dict | list):
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(child for child in item if isinstance(child, dict | list))


_TENSOR_ARCHIVE_FILES = frozenset(
    {"data.pkl", "version", "byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"}
)


def _check_tensor_archive(outer: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    """A torch.save archive nested in a .pt2 (sample inputs): tensors and containers only.

    The model server never unpickles it; it is checked so that the registry stores nothing
    that would run code under any loader.
    """
    data = _read(outer, info, limits)
    try:
        nested = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _refuse(info.filename, "is not a torch.save archive of tensors") from None
    with nested:
        _, members = _check_zip(nested, limits)
        if "data.pkl" not in members:
            raise _refuse(info.filename, "is not a torch.save archive of tensors (no data.pkl)")
        for path, inner in members.items():
            if path not in _TENSOR_ARCHIVE_FILES and re.fullmatch(r"data/[0-9]+", path) is None:
                raise _refuse(f"{info.filename}:{inner.filename}", "is not a part of a tensor archive")
        _check_pickle(
            f"{info.filename}:{members['data.pkl'].filename}",
            _read(nested, members["data.pkl"], limits),
            torchscript=False,
        )


# -- readers ------------------------------------------------------------------------------------


def _check_pickle(member: str, data: bytes, *, torchscript: bool) -> None:
    """Refuse a pickle whose opcodes name any global outside the allow-list."""
    recent: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _REFUSED_OPCODES:
                raise _refuse(member, f"is a pickle that builds objects with {name}")
            if name == "GLOBAL":
                _check_global(member, str(arg).replace("\n", " ").strip(), torchscript)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2:
                    raise _refuse(member, "is a pickle that names a global it computes")
                _check_global(member, f"{recent[-2]} {recent[-1]}", torchscript)
            if name in _STRING_OPCODES:
                recent.append(str(arg))
            elif name not in _MEMO_OPCODES:
                recent.clear()
    except UnsafeArtifact:
        raise
    except Exception:  # noqa: BLE001 - genops raises many kinds on a malformed stream
        raise _refuse(member, "is not a well-formed pickle") from None


def _check_global(member: str, qualified: str, torchscript: bool) -> None:
    if qualified in _TENSOR_GLOBALS or _STORAGE_GLOBAL.fullmatch(qualified):
        return
    if _TORCH_CONSTANT_GLOBAL.fullmatch(qualified):
        return
    torchbind = qualified.startswith(_TORCHBIND_PREFIX)
    if torchscript and _TORCHSCRIPT_CLASS.fullmatch(qualified) and not torchbind:
        return
    if torchscript and _TORCH_QUANTIZED_CLASS.fullmatch(qualified):
        return
    if torchbind:
        raise _refuse(member, f"is a pickle that builds {qualified[:80]!r}, an opaque torchbind (C++) object")
    raise _refuse(
        member,
        f"is a pickle that names {qualified[:80]!r}, which is not a tensor or a TorchScript class; "
        "loading it could run code",
    )


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> bytes:
    if info.file_size > limits.max_inspected_bytes:
        raise _refuse(info.filename, f"is larger than {limits.max_inspected_bytes} bytes")
    try:
        with archive.open(info) as member:
            data = member.read(limits.max_inspected_bytes + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        raise _refuse(info.filename, "cannot be read (damaged, or its sizes lie)") from None
    if len(data) > limits.max_inspected_bytes:
        raise _refuse(info.filename, f"is larger than {limits.max_inspected_bytes} bytes")
    return data


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> Any:
    try:
        return json.loads(_read(archive, info, limits))
    except (ValueError, RecursionError):
        raise _refuse(info.filename, "is not valid JSON") from None


def _described(kind: ArchiveKind) -> str:
    if kind is ArchiveKind.TORCHSCRIPT:
        return "a TorchScript archive (torch.jit.save)"
    return "a torch.export archive (torch.export.save)"


def _refuse(member: str, problem: str, *, field: str = "chunk") -> UnsafeArtifact:
    shown = member if len(member) <= _MAX_SHOWN_CHARS else member[:_MAX_SHOWN_CHARS] + "..."
    if shown:
        message = f"the artifact's member {shown!r} {problem}"
    else:
        message = f"the artifact {problem}"
    return UnsafeArtifact(message[:1000], field=field, metadata={"member": shown})

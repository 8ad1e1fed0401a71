"""Bundle manifest: the one file that says what a bundle holds, validated before anything runs.

A bundle is a folder: ``manifest.json`` + ONNX graphs + one shared weights file + tokenizer.
Every other file is listed under ``files`` with its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import DecoderConfig
from .errors import BundleError

FORMAT = "edge-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # str = symbolic (dynamic) axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    role: str  # "embed" | "prefill" | "decode"
    dtype: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "role": self.role,
            "dtype": self.dtype,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class Manifest:
    model: DecoderConfig
    chunk_length: int
    max_context: int
    graphs: dict[str, GraphSpec]
    tokenizer: dict[str, Any]  # {"file": ..., "chat_template": str | None}
    files: dict[str, dict[str, Any]]  # relative name -> {"size", "sha256"}
    exporter: dict[str, Any]
    source: dict[str, Any]
    quantization: dict[str, Any]
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "exporter": self.exporter,
            "source": self.source,
            "model": self.model.to_dict(),
            "chunk_length": self.chunk_length,
            "max_context": self.max_context,
            "quantization": self.quantization,
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "tokenizer": self.tokenizer,
            "files": self.files,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ---------------------------------------------------------------- hashing / paths


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def safe_relative(name: Any, where: str) -> str:
    """A bundle-relative file name that cannot escape the bundle folder."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: expected a file name, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or ".." in p.parts or name.startswith("~") or ":" in name:
        raise BundleError(f"{where}: file name {name!r} leaves the bundle folder (absolute or '..')")
    return name


# ---------------------------------------------------------------- parsing


def _get(d: dict, key: str, typ, where: str):
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise BundleError(f"{where}.{key}: missing")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise BundleError(f"{where}.{key}: expected {name}, got {type(v).__name__} {v!r:.60}")
    return v


def _tensor(d: Any, where: str) -> TensorSpec:
    shape = _get(d, "shape", list, where)
    for i, s in enumerate(shape):
        if not (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)):
            raise BundleError(f"{where}.shape[{i}]: expected a size or an axis name, got {s!r}")
    return TensorSpec(_get(d, "name", str, where), _get(d, "dtype", str, where), tuple(shape))


def _graph(d: Any, where: str) -> GraphSpec:
    return GraphSpec(
        file=safe_relative(_get(d, "file", str, where), f"{where}.file"),
        role=_get(d, "role", str, where),
        dtype=_get(d, "dtype", str, where),
        inputs=tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_get(d, "inputs", list, where))),
        outputs=tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_get(d, "outputs", list, where))),
    )


def parse_manifest(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest.json. Raises BundleError naming the field at fault."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise BundleError(f"{where}.format: expected {FORMAT!r}, got {data.get('format')!r} (not an edge bundle)")
    version = _get(data, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}.format_version: bundle format {version} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade edge or re-export the model")
    if version < 1:
        raise BundleError(f"{where}.format_version: expected 1..{FORMAT_VERSION}, got {version}")
    files = _get(data, "files", dict, where)
    for name, rec in files.items():
        safe_relative(name, f"{where}.files")
        _get(rec, "size", int, f"{where}.files[{name!r}]")
        sha = _get(rec, "sha256", str, f"{where}.files[{name!r}]")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise BundleError(f"{where}.files[{name!r}].sha256: expected 64 hex digits, got {sha!r:.80}")
    graphs = {k: _graph(g, f"{where}.graphs.{k}") for k, g in _get(data, "graphs", dict, where).items()}
    for k, g in graphs.items():
        if g.file not in files:
            raise BundleError(f"{where}.graphs.{k}.file: {g.file!r} is not listed under files")
    tok = _get(data, "tokenizer", dict, where)
    tok_file = safe_relative(_get(tok, "file", str, f"{where}.tokenizer"), f"{where}.tokenizer.file")
    if tok_file not in files:
        raise BundleError(f"{where}.tokenizer.file: {tok_file!r} is not listed under files")
    if tok.get("chat_template") is not None and not isinstance(tok["chat_template"], str):
        raise BundleError(f"{where}.tokenizer.chat_template: expected a string or null")
    chunk = _get(data, "chunk_length", int, where)
    ctx = _get(data, "max_context", int, where)
    if chunk < 1 or ctx < chunk:
        raise BundleError(f"{where}: chunk_length {chunk} / max_context {ctx} out of range (1 <= chunk <= context)")
    return Manifest(
        model=DecoderConfig.from_dict(_get(data, "model", dict, where), f"{where}.model"),
        chunk_length=chunk,
        max_context=ctx,
        graphs=graphs,
        tokenizer=tok,
        files=files,
        exporter=_get(data, "exporter", dict, where),
        source=_get(data, "source", dict, where),
        quantization=_get(data, "quantization", dict, where),
        format_version=version,
    )


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle folder (does not exist or is not a directory)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle} is not an edge bundle")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return parse_manifest(data, str(path))


def verify_files(bundle: Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Every listed file present with its recorded size (always) and sha256 (unless skipped)."""
    root = Path(bundle).resolve()
    for name, rec in manifest.files.items():
        path = (root / name).resolve()
        if root not in path.parents:
            raise BundleError(f"{bundle}/{name}: resolves outside the bundle folder")
        if not path.is_file():
            raise BundleError(f"{bundle}/{name}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != rec["size"]:
            raise BundleError(f"{bundle}/{name}: size {size} bytes, manifest says {rec['size']} (truncated or changed)")
        if check_hashes and sha256_file(path) != rec["sha256"]:
            raise BundleError(f"{bundle}/{name}: sha256 does not match the manifest (file changed or corrupt)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

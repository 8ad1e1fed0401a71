"""Bundle manifest: the one file that says what a bundle holds, validated before anything runs.

A bundle is a folder: ``manifest.json`` + ONNX graphs + one shared weights file + tokenizer.
Every other file is listed under ``files`` with its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edge.budget import MAX_CONTEXT
from edge.config import DecoderConfig
from edge.errors import BundleError
from edge.vision import VisionConfig
from edge.plans import Plans, parse_plans

FORMAT = "edge-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is ~50 kB; refuse to parse a runaway file
_HASH_BLOCK = 1 << 20
# Formats that can carry pickles (numpy object arrays, torch checkpoints): the bundle format has no
# place for them and the runtime never unpickles anything, so a manifest listing one is refused.
PICKLE_SUFFIXES = (".npy", ".npz", ".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt")


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
    external_data: tuple[str, ...] | None = None  # bundle files its tensors read (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "role": self.role,
            "dtype": self.dtype,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            **({} if self.external_data is None else {"external_data": list(self.external_data)}),
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
    vision: VisionConfig | None = None  # multimodal bundles: image preprocessing + the "vision" graph
    plans: Plans = field(default_factory=Plans)  # prefill plans: fused (default) and, when exported, split

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
            "plans": self.plans.to_dict(),
            "tokenizer": self.tokenizer,
            "files": self.files,
            **({"vision": self.vision.to_dict()} if self.vision is not None else {}),
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
    if not p.parts or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise BundleError(f"{where}: {name!r:.80} is not a usable file name (empty or control characters)")
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
    external = _get(d, "external_data", list, where) if isinstance(d, dict) and "external_data" in d else None
    return GraphSpec(
        file=safe_relative(_get(d, "file", str, where), f"{where}.file"),
        role=_get(d, "role", str, where),
        dtype=_get(d, "dtype", str, where),
        inputs=tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_get(d, "inputs", list, where))),
        outputs=tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_get(d, "outputs", list, where))),
        external_data=None if external is None else tuple(
            safe_relative(n, f"{where}.external_data[{i}]") for i, n in enumerate(external)),
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
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise BundleError(f"{where}.files: {name!r} is a pickle-capable array file; edge bundles never hold "
                              f"one and the runtime never unpickles (weights live in ONNX external data)")
        if _get(rec, "size", int, f"{where}.files[{name!r}]") < 0:
            raise BundleError(f"{where}.files[{name!r}].size: expected a size >= 0, got {rec['size']}")
        sha = _get(rec, "sha256", str, f"{where}.files[{name!r}]")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise BundleError(f"{where}.files[{name!r}].sha256: expected 64 hex digits, got {sha!r:.80}")
    graphs = {k: _graph(g, f"{where}.graphs.{k}") for k, g in _get(data, "graphs", dict, where).items()}
    for k, g in graphs.items():
        if g.file not in files:
            raise BundleError(f"{where}.graphs.{k}.file: {g.file!r} is not listed under files")
        for i, ext in enumerate(g.external_data or ()):
            if ext not in files:
                raise BundleError(f"{where}.graphs.{k}.external_data[{i}]: {ext!r} is not listed under files")
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
    if ctx > MAX_CONTEXT:
        raise BundleError(f"{where}.max_context: expected at most {MAX_CONTEXT} positions (edge's limit), got {ctx}")
    model = DecoderConfig.from_dict(_get(data, "model", dict, where), f"{where}.model")
    return Manifest(
        model=model,
        chunk_length=chunk,
        max_context=ctx,
        graphs=graphs,
        tokenizer=tok,
        files=files,
        exporter=_get(data, "exporter", dict, where),
        source=_get(data, "source", dict, where),
        quantization=_get(data, "quantization", dict, where),
        format_version=version,
        vision=_vision(data, graphs, where),
        plans=parse_plans(data.get("plans"), f"{where}.plans", model.num_layers, graphs),
    )


def _vision(data: dict, graphs: dict[str, GraphSpec], where: str) -> VisionConfig | None:
    if data.get("vision") is None:
        return None
    if "vision" not in graphs:
        raise BundleError(f"{where}.graphs.vision: missing, but the manifest has a vision section")
    return VisionConfig.from_dict(data["vision"], f"{where}.vision")


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle folder (does not exist or is not a directory)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle} is not an edge bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, larger than any manifest ({MAX_MANIFEST_BYTES}); refused")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{path}: not valid JSON ({str(e)[:200]})") from None
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

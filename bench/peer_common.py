"""Helpers the peers share: package versions, the HF folder of a GGUF source, cache keys."""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from edge.bench.worker import Skip


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _need(module: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise Skip(f"{extra} is not installed ({e}); pip install 'edge[bench]'") from None


def _source_key(source: Path, extra: tuple[str, ...] | None = None) -> str:
    """Checksum of the source's files and of ``extra`` (default: the versions optimum's export
    depends on)."""
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    if extra is None:
        extra = tuple(f"{d}={_version(d)}" for d in ("optimum", "optimum-onnx", "transformers", "torch", "onnx"))
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()[:16]


def hf_folder(source: Path, cache: Path, key: str) -> Path:
    """The HF folder transformers (and so optimum's exporter and ORT-GenAI's builder) loads: the
    source itself when it is a folder; for a GGUF, one written by edge's own GGUF reader and HF
    writer (float32 weights: the GGUF's blocks dequantized), once, under ``cache``."""
    if not source.is_file():
        return source
    from edge.export.sources import load_source
    from edge.export.sources.hf_writer import write_hf_folder

    hf = cache / f"hf-{source.stem}-{key}"
    if not (hf / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tmp-hf-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_folder(load_source(source), tmp)
        shutil.rmtree(hf, ignore_errors=True)
        tmp.rename(hf)
    return hf

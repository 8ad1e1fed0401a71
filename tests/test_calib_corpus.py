"""The calibration corpus: the default's domains (none from an evaluation text), the token budget
shared in turn, chats in the model's template, and a user's own files (--calib)."""

from __future__ import annotations

import json

import pytest

from edge.errors import EdgeError
from edge.export.quant import corpus
from edge.export.quant.recipe import CalibrationSpec, calibration_windows
from edge.export.sources import load_source


@pytest.fixture(scope="module")
def llama(zoo):
    return load_source(zoo.folder("llama"))


def _im_start(src) -> int:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(src.tokenizer_json).token_to_id("<|im_start|>")


def test_default_corpus_has_four_domains_none_from_an_evaluation_text():
    from edge.errors import PromptError
    from edge.runtime.perplexity import EVAL_TEXTS, default_text

    texts = corpus.default_texts()
    assert [t.domain for t in texts] == ["docs", "code", "prose", "chat"]
    assert all(len(t.text) > 5000 for t in texts[:3]) and len(texts[3].chats) >= 40
    evals = [default_text()]  # all of pydoc_data.topics, not only its held-out half
    for _, load in EVAL_TEXTS.values():
        try:
            evals.append(load())
        except PromptError:  # a text this machine lacks cannot overlap either
            pass
    for t in texts[:3]:
        lines = [ln.strip() for ln in t.text.splitlines() if len(ln.strip()) > 60]
        shared = [ln for ln in lines[::7] if any(ln in e for e in evals)]
        assert len(shared) <= len(lines[::7]) // 50, (t.domain, shared[:3])  # a stray common line at most


def test_default_windows_take_the_domains_in_turn(llama):
    wins = calibration_windows(llama.tokenizer_json, llama.chat_template, CalibrationSpec(tokens=2000, window=128))
    used = corpus.tokens_per_domain(wins)
    wins = [ids for _, ids in wins]
    assert sum(map(len, wins)) == 2000 == sum(used.values()) and all(0 < len(w) <= 128 for w in wins)
    assert list(used) == ["docs", "code", "prose", "chat"] and min(used.values()) > 100
    im_start = _im_start(llama)
    chats = wins[3::4]  # docs, code, prose, chat, docs, ...
    assert all(w[0] == im_start and w.count(im_start) >= 2 for w in chats)  # (system,) user, assistant turns
    assert all(im_start not in w for i, w in enumerate(wins) if i % 4 != 3)


def test_without_a_template_chats_are_plain_text(llama):
    wins = calibration_windows(llama.tokenizer_json, None, CalibrationSpec(tokens=2000, window=128))
    assert "chat" in corpus.tokens_per_domain(wins)
    wins = [ids for _, ids in wins]
    assert all(_im_start(llama) not in w for w in wins)


def test_user_files_and_folders(llama, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Plain text about the harbour and the boats. " * 40)
    (tmp_path / "notes" / ".hidden.txt").write_text("never read " * 100)
    (tmp_path / "notes" / "chats.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi there"},
                                 {"role": "assistant", "content": "Hello! How can I help?"}]}) + "\n\n")
    texts = corpus.user_texts([tmp_path / "notes"])
    assert [t.domain.rsplit("/", 1)[-1] for t in texts] == ["a.txt", "chats.jsonl"]
    assert texts[1].chats[0][0] == {"role": "user", "content": "hi there"}
    spec = CalibrationSpec(texts=tuple(texts), tokens=300, window=64)
    wins = calibration_windows(llama.tokenizer_json, llama.chat_template, spec)
    assert sum(corpus.tokens_per_domain(wins).values()) <= 300 and wins[1][1][0] == _im_start(llama)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such file or folder"),
    (lambda p: (p / "e").mkdir() or p / "e", "no text found"),
    (lambda p: (p / "b.jsonl").write_text('{"messages": "no"}\n') and p / "b.jsonl", "b.jsonl:1: expected a JSON object"),
    (lambda p: (p / "x.bin").write_bytes(b"\xff\xfe\x00") and p / "x.bin", "cannot read as UTF-8"),
])
def test_bad_calibration_paths_are_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(EdgeError, match=message) as e:
        corpus.user_texts([path])
    assert str(path.name) in str(e.value)


def test_cli_calib_folder_reaches_the_manifest(zoo, cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "b"
    r = cli("edge.export.cli", zoo.folder("qwen2"), "-o", out, "--chunk", "16", "--context", "64", "--plans", "fused",
            "--calib", tmp_path / "mine", "--calib-tokens", "200", "--no-accuracy-report")
    assert r.returncode == 0, r.stderr
    cal = json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]
    assert cal["tokens"] == 200 and list(cal["domains"]) == [str(tmp_path / "mine" / "t.txt")], cal
    bad = cli("edge.export.cli", zoo.folder("qwen2"), "-o", tmp_path / "c", "--calib", tmp_path / "nope")
    assert bad.returncode == 2 and "--calib" in bad.stderr and "nope" in bad.stderr and not (tmp_path / "c").exists()


def test_hessian_weights_give_each_domain_an_equal_share():
    wins = [("docs", [1] * 100), ("chat", [2] * 20), ("docs", [1] * 100), ("chat", [2] * 20), ("docs", [1] * 100)]
    w = corpus.hessian_weights(wins, 220)  # the first three windows reach the budget
    assert w[3:] == [0.0, 0.0]
    share = {}
    for (d, ids), x in zip(wins, w):
        share[d] = share.get(d, 0) + x * len(ids)
    assert share == pytest.approx({"docs": 0.5, "chat": 0.5})

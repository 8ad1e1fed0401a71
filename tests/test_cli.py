"""The three CLIs in subprocesses: edge-export -> edge-run / edge-eval, and their failures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from edge.runtime import Model
from edge.runtime.perplexity import log_softmax, windows_of

CONTEXT = 128
TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "In the beginning there was nothing, and then "
        "there was a tiny model that predicted bytes badly but consistently. ") * 3


@pytest.fixture(scope="module")
def exported(zoo, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    r = cli("edge.export.cli", zoo.folder("llama"), "-o", out, "--chunk", "16", "--context", str(CONTEXT), "--quant", "fp32")
    assert r.returncode == 0, r.stderr
    return out, r


def test_export_default_is_w8a8_with_an_accuracy_report(zoo, cli, tmp_path):
    r = cli("edge.export.cli", zoo.folder("llama"), "-o", tmp_path / "d", "--chunk", "16", "--context", "64",
            "--eval-tokens", "256")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["quantization"]["prefill"] == "w8a8" and manifest["quantization"]["decode"] == "int8"
    assert "calibrating" in r.stderr and "(fused/split plans), pydoc-heldout" in r.stderr
    # one progress count: load, calibrate, plan, build, write, measure; every stage numbered against it
    stages = re.findall(r"^\[(\d+)/(\d+)\]", r.stderr, re.M)
    assert [int(k) for k, _ in stages] == list(range(1, 7)) and {n for _, n in stages} == {"6"}, stages
    acc = manifest["quantization"]["accuracy"]
    assert {r["tokens"] for r in acc["fused"].values() if "tokens" in r} == {256} == {r["tokens"] for r in acc["cpu"].values()}


def test_quant_auto_resolves_by_model_kind():
    from edge.export.quant.options import resolve_scheme

    assert resolve_scheme("auto", multimodal=False) == "w8a8" and resolve_scheme("auto", multimodal=True) == "fp32"
    assert resolve_scheme("w8a8", multimodal=True) == "w8a8" and resolve_scheme("fp32", multimodal=False) == "fp32"


def assert_clean_failure(r, *words):
    assert r.returncode != 0
    assert "error:" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_export_writes_a_bundle_with_progress(exported):
    out, r = exported
    assert (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chunk_length"] == 16 and manifest["max_context"] == CONTEXT
    assert manifest["source"]["kind"] == "hf-folder"
    assert "[1/3]" in r.stderr and "wrote" in r.stderr  # progress goes to stderr
    assert r.stdout == ""


def test_export_quiet(zoo, cli, tmp_path):
    r = cli("edge.export.cli", zoo.folder("qwen2"), "-o", tmp_path / "q", "--chunk", "16", "--context", "64", "--quiet")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    assert Model.load(tmp_path / "q").config.attention_bias


@pytest.mark.parametrize("raw", (True, False))
def test_run_prints_the_generation(exported, cli, raw):
    out, _ = exported
    prompt = "hello world"
    r = cli("edge.runtime.cli", out, "--prompt", prompt, "--max-new-tokens", "12", *(["--raw"] if raw else []),
            "--stats")
    assert r.returncode == 0, r.stderr
    expected = Model.load(out).generate(prompt, max_new_tokens=12, raw=raw)
    assert r.stdout == expected + "\n"
    assert "new tokens" in r.stderr and "tok/s" in r.stderr


def test_run_sampling_is_seeded(exported, cli):
    out, _ = exported
    args = (out, "--prompt", "hello world", "--raw", "--max-new-tokens", "10", "--temperature", "1.0", "--seed", "7")
    r1, r2 = cli("edge.runtime.cli", *args), cli("edge.runtime.cli", *args)
    assert r1.returncode == 0 and r1.stdout == r2.stdout
    assert r1.stdout == Model.load(out).generate("hello world", 10, temperature=1.0, seed=7, raw=True) + "\n"


def hf_perplexity(zoo, ids: list[int], window: int, tokens: int) -> float:
    hf = zoo.hf_model("llama")
    total, count = 0.0, 0
    for w in windows_of(ids, window, tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([w])).logits[0].numpy()
        lp = log_softmax(logits[:-1])
        total -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    assert count == tokens
    return float(np.exp(total / count))


def test_eval_perplexity_json_matches_transformers(exported, cli, zoo, tmp_path):
    out, _ = exported
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    tokens = 300  # windows of 128 ids: 127 + 127 + 46 predictions (a short last window)
    r = cli("edge.runtime.eval_cli", out, "--perplexity", "--json", "--text", text, "--tokens", str(tokens))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens"] == tokens and result["windows"] == 3 and result["window"] == CONTEXT
    ids = Model.load(out).tokenizer.encode(TEXT)
    ref = hf_perplexity(zoo, ids, CONTEXT, tokens)
    assert result["perplexity"] == pytest.approx(ref, rel=1e-3)
    assert result["nll"] == pytest.approx(np.log(ref), rel=1e-3)


def test_eval_plain_output(exported, cli, tmp_path):
    out, _ = exported
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    r = cli("edge.runtime.eval_cli", out, "--perplexity", "--text", text, "--tokens", "50", "--window", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ") and "over 50 tokens" in r.stdout and "windows of 32" in r.stdout


# ---------------------------------------------------------------- failures: exit code, one-line error


def test_cli_failures(exported, cli, zoo, tmp_path):
    out, _ = exported
    not_a_bundle = tmp_path / "stuff"
    not_a_bundle.mkdir()
    (not_a_bundle / "notes.txt").write_text("mine")
    missing_text = tmp_path / "missing.txt"
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"\xff\xfe\xfa not utf-8")
    cases = [
        (("edge.runtime.cli", tmp_path / "nope", "--prompt", "hi"), ["edge-run: error:", "not a bundle folder"]),
        (("edge.runtime.cli", out, "--prompt", "x" * 200, "--raw"), ["200 tokens", f"{CONTEXT}"]),
        (("edge.runtime.cli", out, "--prompt", "hi", "--temperature", "-1"), ["temperature"]),
        (("edge.runtime.cli", out, "--prompt", "hi", "--top-p", "0"), ["top_p"]),
        (("edge.export.cli", tmp_path / "no-model", "-o", tmp_path / "o1"), ["edge-export: error:", "no such file"]),
        (("edge.export.cli", zoo.folder("llama"), "-o", not_a_bundle), ["not an edge bundle", "refusing to overwrite"]),
        (("edge.export.cli", zoo.folder("llama"), "-o", tmp_path / "o2", "--chunk", "0"), ["argument --chunk", ">= 1"]),
        (("edge.export.cli", zoo.folder("llama"), "-o", tmp_path / "o3", "--chunk", "64", "--context", "32"),
         ["max context 32", "chunk length 64"]),
        (("edge.runtime.eval_cli", out, "--perplexity", "--text", missing_text), ["edge-eval: error:", "missing.txt"]),
        (("edge.runtime.eval_cli", out, "--perplexity", "--text", bad_text), ["UTF-8"]),
        (("edge.runtime.eval_cli", tmp_path / "nope", "--perplexity", "--json"), ["not a bundle folder"]),
    ]
    for args, words in cases:
        r = cli(*args)
        assert_clean_failure(r, *words)
    assert (not_a_bundle / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith((".o1", ".o2", ".o3", ".stuff")) for p in tmp_path.iterdir())


def test_changed_bundle_refused_by_cli(zoo, cli, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    data = bytearray((b / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (b / "weights.bin").write_bytes(bytes(data))
    assert_clean_failure(cli("edge.runtime.cli", b, "--prompt", "hi"), "weights.bin", "sha256")
    r = cli("edge.runtime.cli", b, "--prompt", "hi", "--raw", "--no-verify", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr

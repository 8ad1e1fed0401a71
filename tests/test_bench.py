"""edge-bench on a tiny bundle, peers disabled or unavailable: the JSON report's schema, the PNG,
skipped peers reported with a reason (never as zeros), and the bench core's board-only imports;
ORT-GenAI's peer (its environment missing; on the real SmolLM2 weights when its environment and
model are cached)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAT_KEYS = {"median", "min", "max", "n"}


def _check_stat(stat, positive=True):
    assert set(stat) == STAT_KEYS, stat
    assert stat["min"] <= stat["median"] <= stat["max"], stat
    assert stat["n"] >= 1
    if positive:
        assert stat["min"] > 0, stat


def check_report(report: dict, lengths: list[int], new_tokens: int) -> None:
    assert report["schema"] == "edge-bench/1"
    meta = report["meta"]
    for key in ("date", "machine", "threads", "prompt_tokens", "new_tokens", "repeat", "rounds", "onnxruntime",
                "prompt_source", "timing", "load_average"):
        assert key in meta, key
    assert meta["prompt_tokens"] == lengths and meta["new_tokens"] == new_tokens
    assert isinstance(report["systems"], list) and report["systems"]
    for s in report["systems"]:
        assert {"name", "kind", "status", "results"} <= set(s), s
        assert s["status"] in ("ok", "partial", "skipped", "failed")
        if s["status"] != "ok":
            assert s.get("reason"), f"{s['name']}: {s['status']} without a reason"
        for r in s["results"]:
            assert r["prompt_tokens"] in lengths
            if r["status"] != "ok":
                assert r.get("reason") and "prefill_tok_s" not in r, r  # never a zero figure
                continue
            for metric in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mib"):
                _check_stat(r[metric])
            assert len(r["tokens"]) == new_tokens + 1
            assert 0 <= r["greedy_prefix_match"] <= new_tokens + 1
        if s["status"] == "ok":
            assert s["size_bytes"] > 0
    assert isinstance(report["ratios"], list)


def test_bench_tiny_bundle(zoo, tmp_path):
    from edge.bench.cli import main

    bundle = zoo.bundle("llama", 16)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"
    lengths, new = [12, 20], 3  # one chunk, two chunks (the last padded)
    rc = main([str(bundle), "--prompt-tokens", ",".join(map(str, lengths)), "--new-tokens", str(new),
               "--repeat", "2", "--threads", "1", "--json", str(out_json), "--plot", str(out_png),
               "--compare", "llama.cpp", "--gguf", str(tmp_path / "missing.gguf"), "--quiet", "--lookup", "4"])
    assert rc == 0
    report = json.loads(out_json.read_text())
    check_report(report, lengths, new)
    by_name = {s["name"]: s for s in report["systems"]}
    # the CPU plan once more with prompt lookup decoding: its own row, the same greedy tokens (float bundle)
    cpu, lookup = by_name[f"edge {bundle.name} cpu"], by_name[f"edge {bundle.name} cpu +lookup4"]
    assert lookup["status"] == "ok" and [r["tokens"] for r in lookup["results"]] == [r["tokens"] for r in cpu["results"]]
    assert all(r["config"]["lookup"]["draft_tokens"] == 4 for r in lookup["results"])
    assert "lookup" not in cpu["results"][0]["config"]

    fused = by_name[f"edge {bundle.name} fused"]
    assert fused["status"] == "ok" and fused["kind"] == "edge"
    assert fused["size_bytes"] == sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    assert [r["greedy_prefix_match"] for r in fused["results"]] == [new + 1] * 2  # the reference itself
    # every plan the bundle records is measured (or says why not)
    from edge.manifest import read_manifest

    plans = read_manifest(bundle).plans.names
    assert {f"edge {bundle.name} {p}" for p in plans} <= set(by_name)
    if "split" in plans and by_name[f"edge {bundle.name} split"]["status"] == "ok":
        split = by_name[f"edge {bundle.name} split"]
        # same greedy tokens as the fused plan (same math, other order)
        assert [r["tokens"] for r in split["results"]] == [r["tokens"] for r in fused["results"]]

    peer = by_name["llama.cpp"]
    assert peer["status"] == "skipped" and "missing.gguf" in peer["reason"] and peer["results"] == []
    assert report["ratios"] == []  # nothing to divide by: no peer measured

    pngs = [out_png] + sorted(out_png.parent.glob("bench_gantt_*.png"))
    assert report["meta"]["plots"] == [str(p) for p in pngs]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_ratios_and_table():
    from edge.bench.report import ratios, table

    def row(name, kind, prefill, decode, status="ok"):
        res = {"prompt_tokens": 128, "status": status}
        if status == "ok":
            res.update({m: {"median": v, "min": v, "max": v, "n": 1} for m, v in
                        (("prefill_tok_s", prefill), ("decode_tok_s", decode), ("ttft_ms", 128e3 / prefill),
                         ("peak_rss_mib", 100.0))})
        else:
            res["reason"] = "not installed"
        return {"name": name, "kind": kind, "status": status, "results": [res], "size_bytes": 10}

    rows = [row("edge a fused", "edge", 1000, 100), row("llama.cpp", "llama.cpp", 500, 200),
            row("optimum fp32", "optimum", 0, 0, status="skipped")]
    q = ratios(rows)
    assert q == [{"system": "edge a fused", "vs": "llama.cpp", "peer_kind": "llama.cpp", "prompt_tokens": 128,
                  "prefill": 2.0, "decode": 0.5, "ttft": 0.5, "peak_rss": 1.0, "prefill_best": 2.0,
                  "decode_best": 0.5}]
    report = {"systems": rows, "ratios": q, "meta": {"machine": {"cpu": "x", "cores": 2}, "threads": 2, "rounds": 1,
                                                      "repeat": 1, "load_average": None, "date": "d"}}
    text = table(report)
    assert "2.00x" in text and "not installed" in text


@pytest.mark.parametrize("module", ["edge.bench.run", "edge.bench.cli", "edge.bench.report"])
def test_bench_core_imports_on_a_board(module):
    """The bench core needs only what a board has: the peers' packages are imported in children."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {{"torch", "transformers", "optimum", "onnx", "edge.export", "gguf", "llama_cpp", "matplotlib"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(name + " blocked")
        sys.meta_path.insert(0, Block())
        import {module}
        from edge.bench.cli import build_parser
        build_parser().parse_args(["b", "--compare", "llama.cpp,optimum,ort-genai"])
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_op_profile_tiny_bundle(zoo, capsys):
    """edge.bench.op_profile: per-operator kernel time of one real prefill chunk, after a real prefix."""
    from edge.bench import op_profile

    bundle = zoo.bundle("llama", 16)
    prof = op_profile.profile_chunk(bundle, past=16, repeat=2, threads=1)
    assert prof.total_ms > 0 and all(ms >= 0 for ms in prof.ms_per_op.values())
    assert {"MatMul", "Gemm", "FusedMatMul"} & set(prof.ms_per_op), prof.ms_per_op  # the linears ran
    assert all(n >= 1 for n in prof.nodes_per_op.values())
    assert op_profile.main([str(bundle), "--past", "0", "--repeat", "1", "--threads", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["bundle"] == str(bundle) and row["total_ms"] > 0
    with pytest.raises(SystemExit, match="exceeds the bundle's context"):
        op_profile.profile_chunk(bundle, past=10_000, repeat=1, threads=1)


# ------------------------------------------------------------------------------------------ ORT-GenAI
def test_parser_and_systems_for_ort_genai(tmp_path):
    from edge.bench.cli import build_parser
    from edge.bench.run import PEERS, BenchOptions, peer_systems

    assert "ort-genai" in PEERS
    for compare in ("ort-genai", "llama.cpp,optimum,ort-genai"):
        args = build_parser().parse_args(["b", "--compare", compare, "--ort-genai-python", "/x/python"])
        assert args.compare == tuple(compare.split(",")) and args.ort_genai_python == "/x/python"
    # one peer name, two systems: the builder's int8 and int4 models of the bundle's source
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    manifest = SimpleNamespace(source={"kind": "gguf", "path": str(gguf)})
    systems = peer_systems(manifest, BenchOptions(compare=("ort-genai",), ort_genai_python="/x/python", lookup=0))
    assert [(s.name, s.kind, s.params["precision"]) for s in systems] == [
        ("ort-genai int8", "ort-genai", "int8"), ("ort-genai int4", "ort-genai", "int4")]
    assert all(s.skip is None and s.params["source"] == str(gguf) and s.params["python"] == "/x/python"
               for s in systems)
    # by default each also with its own n-gram speculative decoding, as edge's CPU plan with lookup
    systems = peer_systems(manifest, BenchOptions(compare=("ort-genai", "llama.cpp"), gguf=str(gguf)))
    assert [(s.name, s.params.get("lookup")) for s in systems] == [
        ("ort-genai int8", None), ("ort-genai int8 +lookup4", 4), ("ort-genai int4", None),
        ("ort-genai int4 +lookup4", 4), ("llama.cpp", None), ("llama.cpp +lookup4", 4)]
    gone = SimpleNamespace(source={"kind": "hf", "path": str(tmp_path / "gone")})
    systems = peer_systems(gone, BenchOptions(compare=("ort-genai",)))
    assert len(systems) == 4 and all("ORT-GenAI's model builder" in s.skip for s in systems)
    assert all("python" not in s.params for s in systems)  # default: its venv, found when prepared


@pytest.mark.parametrize("python", ["missing", "no-builder"])
def test_ort_genai_without_its_environment_is_skipped(zoo, tmp_path, python):
    """An interpreter that does not exist, or one that cannot import onnxruntime-genai's builder:
    both systems are reported skipped with the reason; the bundle is still measured."""
    from edge.bench.cli import main

    interpreter = tmp_path / "venv" / "bin" / "python"
    if python == "no-builder":
        interpreter.parent.mkdir(parents=True)
        interpreter.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'onnxruntime_genai'\" >&2\nexit 1\n")
        interpreter.chmod(0o755)
    bundle = zoo.bundle("llama", 16)
    out_json, cache = tmp_path / "bench.json", tmp_path / "cache"
    rc = main([str(bundle), "--plans", "fused", "--prompt-tokens", "12", "--new-tokens", "2", "--repeat", "1",
               "--warmup", "0", "--threads", "1", "--compare", "ort-genai", "--ort-genai-python", str(interpreter),
               "--cache-dir", str(cache), "--json", str(out_json), "--quiet"])
    assert rc == 0
    report = json.loads(out_json.read_text())
    check_report(report, [12], 2)
    by_name = {s["name"]: s for s in report["systems"]}
    assert by_name[f"edge {bundle.name} fused"]["status"] == "ok"
    expect = "cannot run" if python == "missing" else "does not import"
    for precision in ("int8", "int4"):
        peer = by_name[f"ort-genai {precision}"]
        assert peer["kind"] == "ort-genai" and peer["status"] == "skipped" and peer["results"] == []
        assert expect in peer["reason"] and str(interpreter) in peer["reason"], peer["reason"]
    assert report["ratios"] == []
    assert not list(cache.glob("venv-ort-genai-*")) and not list(cache.glob("ort-genai-*"))  # nothing made


def test_ort_genai_failed_step_skips_with_the_log_tail(tmp_path):
    from edge.bench.ort_genai import _run_logged
    from edge.bench.worker import Skip

    log = tmp_path / "step.log"
    with pytest.raises(Skip, match=r"the builder exited 3 .*boom"):
        _run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log, "the builder")
    assert "boom" in log.read_text()


@pytest.mark.real
def test_ort_genai_real_smollm2(tmp_path):
    """ORT-GenAI int8 (its own builder's model of the same weights) through edge-bench's child, when
    its environment and model are already in the default cache (edge-bench --compare ort-genai
    makes them): the same first greedy tokens as the float weights in transformers, the threads,
    the 2048 context and the shared past/present buffer it ran with."""
    from edge.bench import peers
    from edge.bench.run import PEER_MODULE, BenchOptions, System, prompt_ids, run_child
    from edge.bench.worker import Skip
    from edge.export.sources.gguf_file import smollm2_path

    cache = Path(BenchOptions().cache_dir)
    spec = {"source": str(smollm2_path()), "cache_dir": str(cache), "precision": "int8", "cached_only": True}
    try:
        prep = peers.prepare_ort_genai(spec)
    except Skip as e:
        pytest.skip(f"{e}: `edge-bench BUNDLE --compare ort-genai` makes it once")
    built = json.loads((Path(prep["params"]["model_dir"]).parent / "edge-bench.json").read_text())
    hf = Path(built["hf_folder"])
    ids = prompt_ids(hf / "tokenizer.json", 32)
    new = 4
    opts = BenchOptions(new_tokens=new, repeat=1, warmup=0, threads=1)
    system = System("ort-genai int8", "ort-genai", PEER_MODULE, {**prep["params"], "precision": "int8", "n_ctx": 2048})
    res = run_child(system, ids, opts, lambda _msg: None)
    assert res["status"] == "ok", res
    assert len(res["tokens"]) == new + 1 and res["prefill_tok_s"][0] > 0 and res["decode_tok_s"][0] > 0
    assert res["config"]["intra_op_num_threads"] == 1 and res["config"]["max_length"] == 2048
    assert res["config"]["past_present_share_buffer"] is True
    assert res["version"].startswith(f"onnxruntime-genai {peers.ORT_GENAI_VERSION}")

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)[0, len(ids):].tolist()
    assert res["tokens"][:2] == ref  # int8 weights, dynamic int8 activations: the leading tokens agree
    # its own n-gram speculative decoding (the "+lookup" row): the generator's loop, its options kept
    lookup = System("ort-genai int8 +lookup4", "ort-genai", PEER_MODULE, {**system.params, "lookup": 4})
    res = run_child(lookup, prompt_ids(hf / "tokenizer.json", 64), opts, lambda _msg: None)
    assert res["status"] == "ok", res
    assert len(res["tokens"]) == new + 1
    assert res["config"]["lookup"]["speculative_options"]["max_draft_tokens"] == 4


@pytest.mark.real
def test_llama_cpp_lookup_real_gguf():
    """llama.cpp with edge's lookup loop (edge-bench's "llama.cpp +lookup" row) on the real GGUF:
    drafts checked in llama.cpp batches with a logits row each, the rows after a miss dropped; its
    tokens are the model's argmax at each position, so the first ones equal one token per call."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    import llama_cpp

    from edge.bench.peers import measure_llama_cpp
    from edge.export.sources.gguf_file import smollm2_path
    from edge.runtime.perplexity import license_text

    gguf = smollm2_path()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    ids = llm.tokenize(license_text()[:1200].encode(), add_bos=False)[:200]
    del llm
    spec = {"gguf": str(gguf), "prompt_ids": ids, "threads": 2, "n_ctx": 512, "new_tokens": 24, "repeat": 1,
            "warmup": 0}
    plain, drafted = measure_llama_cpp(spec), measure_llama_cpp({**spec, "lookup": 4})
    assert len(drafted["tokens"]) == 25 and drafted["config"]["lookup"]["calls"] > 0
    assert drafted["tokens"][:4] == plain["tokens"][:4]

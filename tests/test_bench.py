"""edge-bench on a tiny bundle, peers disabled or unavailable: the JSON report's schema, the PNG,
skipped peers reported with a reason (never as zeros), and the bench core's board-only imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
               "--compare", "llama.cpp", "--gguf", str(tmp_path / "missing.gguf"), "--quiet"])
    assert rc == 0
    report = json.loads(out_json.read_text())
    check_report(report, lengths, new)
    by_name = {s["name"]: s for s in report["systems"]}

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
        build_parser().parse_args(["b", "--compare", "llama.cpp,optimum"])
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

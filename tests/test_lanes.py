"""Lanes, the split prefill plan and its trace, on tiny random models (and the real SmolLM2, marked).

The split plan must give the same tokens as the fused plan: every comparison below is exact on
greedy tokens and tight (1e-4) on logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import VARIANTS
from edge.errors import BundleError, DeviceError
from edge.runtime import Model
from edge.runtime.lanes import choose_accelerator, list_devices, make_lanes

CHUNK = 16
VOCAB = 300


def ids_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(500 + n + seed).integers(0, VOCAB, n).tolist()


@pytest.fixture(scope="module")
def split_models(zoo):
    """(fused, split on cpu + second-CPU lanes) per tiny variant."""
    out = {}
    for name in VARIANTS:
        bundle = zoo.bundle(name, CHUNK)
        out[name] = (Model.load(bundle, plan="fused", verify_hashes=False),
                     Model.load(bundle, plan="split", accelerator="cpu", verify_hashes=False))
    return out


# ---------------------------------------------------------------- devices and lanes

def test_devices_always_include_the_cpu():
    names = [d.name for d in list_devices()]
    assert names[-1] == "cpu"
    assert choose_accelerator("none") is None
    auto = choose_accelerator("auto")
    assert auto is not None and not auto.simulated  # auto never picks the HTP simulator


def test_a_missing_accelerator_is_a_clear_error():
    with pytest.raises(DeviceError, match="not available here.*available: .*cpu"):
        choose_accelerator("rknpu-that-is-not-here")


def test_cpu_lanes_share_sessions(zoo):
    lanes = make_lanes("cpu", 1, 1)
    path = zoo.bundle("llama", CHUNK) / "split.act.onnx"
    assert lanes["cpu"].session(path) is lanes["accel"].session(path)
    import threading

    worker = lanes["accel"].submit(lambda: threading.current_thread().name).result()
    assert worker.startswith("edge-lane-accel") and worker != threading.current_thread().name  # its own thread
    # many small sessions: none keeps an arena of its own (peak memory, see Lane.options)
    assert lanes["cpu"].session(path).get_session_options().enable_cpu_mem_arena is False
    for lane in lanes.values():
        lane.close()


# ---------------------------------------------------------------- fused vs split

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("n", [1, CHUNK, 2 * CHUNK + 1, 100])  # one chunk, exactly full, partial last, many
def test_split_logits_and_tokens_match_fused(split_models, name, n):
    fused, split = split_models[name]
    ids = ids_of(n)
    a = fused.prefill(fused.embed(ids), fused.new_cache(), all_logits=True)
    b = split.prefill(split.embed(ids), split.new_cache(), all_logits=True)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert list(split.generate_ids(ids, 12)) == list(fused.generate_ids(ids, 12))


def test_split_fills_the_cache_like_fused_and_continues(split_models):
    fused, split = split_models["qwen2"]
    first, second = ids_of(20), ids_of(37, seed=1)
    caches = []
    for m in (fused, split):
        cache = m.new_cache()
        m.prefill(m.embed(first), cache)
        last = m.prefill(m.embed(second), cache)  # continuation: starts at position 20, mid-chunk
        caches.append((cache, last))
    (cf, lf), (cs, ls) = caches
    assert cf.length == cs.length == 57
    np.testing.assert_allclose(cs.keys[:, :57], cf.keys[:, :57], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cs.values[:, :57], cf.values[:, :57], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ls, lf, atol=1e-4, rtol=0)


def test_sequential_and_single_lane_give_the_same_logits(zoo, split_models):
    fused, split = split_models["llama"]
    ids = ids_of(45)
    ref = split.prefill(split.embed(ids), split.new_cache(), all_logits=True)
    seq = split.split_prefill.prefill(split.embed(ids), split.new_cache(), all_logits=True, sequential=True)
    np.testing.assert_array_equal(seq, ref)
    alone = Model.load(zoo.bundle("llama", CHUNK), plan="split", accelerator="none", verify_hashes=False)
    assert list(alone.split_prefill.lanes) == ["cpu"]
    np.testing.assert_array_equal(alone.prefill(alone.embed(ids), alone.new_cache(), all_logits=True), ref)


def test_attention_over_cache_prefixes(zoo, split_models):
    """The fused prefill takes a dynamic cache, so the split attention reads only the rows below
    the chunk's start too (cheaper); its cost then grows with the chunk's position."""
    fused, _ = split_models["llama"]
    split = Model.load(zoo.bundle("llama", CHUNK), plan="split", accelerator="cpu", verify_hashes=False)
    assert split.split_prefill.prefix_rows and fused.chunks.prefix_rows
    ids = ids_of(70)
    from edge.runtime.split_prefill import _Run

    run = _Run(split.split_prefill, split.embed(ids), split.new_cache(), 0, False)
    # attention of chunk c reads exactly the c * CHUNK rows before it, in every layer
    assert [run._value("@past_key", c, layer).shape[0] for c in range(len(run.chunks)) for layer in (0, 1)] == \
        [c * CHUNK for c in range(len(run.chunks)) for _ in (0, 1)]
    assert set(split.split_prefill.costs.growth) <= {"attn"}  # only cache readers may grow with position
    np.testing.assert_allclose(split.prefill(split.embed(ids), split.new_cache(), all_logits=True),
                               fused.prefill(fused.embed(ids), fused.new_cache(), all_logits=True), atol=1e-4, rtol=0)


def test_trace_records_every_task(split_models, tmp_path):
    _, split = split_models["llama"]
    ids = ids_of(3 * CHUNK)
    split.prefill(split.embed(ids), split.new_cache())
    trace = split.split_prefill.last_trace
    layers = split.config.num_layers
    assert len(trace.events) == 3 * (1 + 8 * layers) + 1  # the head runs on the last chunk only
    assert {e.lane for e in trace.events} <= {"cpu", "accel"}
    stats = trace.stats()
    assert 0 <= stats["bubble_fraction"] < 1 and stats["wall_s"] > 0
    for lane in trace.lanes:  # no lane runs two tasks at once
        ev = sorted((e for e in trace.events if e.lane == lane), key=lambda e: e.start)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(ev, ev[1:]))
    data = json.loads(trace.save(tmp_path / "t.json").read_text())
    assert sum(e["ph"] == "X" for e in data["traceEvents"]) == len(trace.events)
    assert "bubble_fraction" in data["otherData"]
    pytest.importorskip("matplotlib")
    png = trace.gantt(tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_w8a8_side_paths_go_to_cpu_stages_and_match_fused(zoo, tmp_path):
    """A W8A8 export (calibrated, with outlier side paths): the int8 main paths land in the
    accelerator graphs, each float side path in the CPU stage that consumes the linear."""
    import onnx

    from edge.config import ExportOptions
    from edge.manifest import read_manifest
    from edge.progress import Progress
    from edge.export.pipeline import export_model
    from edge.export.quant.recipe import AccuracySpec, CalibrationSpec
    from edge.export.quant.plan import QuantOptions

    out = tmp_path / "w8a8"
    export_model(zoo.folder("qwen2"), out, ExportOptions(chunk_length=CHUNK, max_context=128), Progress(enabled=False),
                 quant=QuantOptions(prefill="w8a8", outliers="4", hot_budget=0.05, smooth="off"),
                 calibration=CalibrationSpec(tokens=512, window=64), accuracy=AccuracySpec(enabled=False))
    m = read_manifest(out)
    assert m.plans.split.side_paths
    side_ops = {"Gather", "Clip"}  # the side path's hot-channel gather and clip
    has_side = set()
    for st in m.plans.split.stages:
        for g in st.graphs:
            ops = {n.op_type for n in onnx.load(str(out / m.graphs[g].file), load_external_data=False).graph.node}
            if st.lane == "accel":
                assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and not ops & side_ops, (g, ops)
            elif side_ops <= ops:
                has_side.add(st.name)
    assert has_side and has_side <= {"attn", "post_attn", "act", "post_mlp", "head"}  # head: CPU, int8 rows
    fused = Model.load(out, threads=1, verify_hashes=False, plan="fused")
    split = Model.load(out, plan="split", accelerator="cpu", verify_hashes=False)
    ids = ids_of(40)
    a = fused.prefill(fused.embed(ids), fused.new_cache(), all_logits=True)
    b = split.prefill(split.embed(ids), split.new_cache(), all_logits=True)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert list(split.generate_ids(ids, 12)) == list(fused.generate_ids(ids, 12))


# ---------------------------------------------------------------- bundle / manifest / CLI

def test_manifest_describes_the_split_plan(zoo):
    from edge.manifest import read_manifest

    m = read_manifest(zoo.bundle("llama", CHUNK))
    assert m.plans.default == "cpu" and m.plans.names == ("cpu", "fused", "split")
    stages = {s.name: s for s in m.plans.split.stages}
    assert {s.lane for s in stages.values()} == {"cpu", "accel"}
    assert stages["attn"].cross_chunk and stages["attn"].graphs == ("split.attn",)  # shared by all layers
    assert stages["qkv"].graphs == tuple(f"split.qkv.{i}" for i in range(m.model.num_layers))
    for s in m.plans.split.stages:
        for g in s.graphs:
            assert m.graphs[g].role == "split" and m.graphs[g].external_data in ((), ("weights.bin",))


def test_bad_plans_are_refused(zoo, tmp_path):
    from edge.manifest import parse_manifest

    data = json.loads((zoo.bundle("llama", CHUNK) / "manifest.json").read_text())
    data["plans"]["split"]["stages"][1]["graphs"] = ["split.missing"]
    with pytest.raises(BundleError, match="split.missing"):
        parse_manifest(data)
    data = json.loads((zoo.bundle("llama", CHUNK) / "manifest.json").read_text())
    data["plans"]["split"]["stages"][1]["lane"] = "gpu"
    with pytest.raises(BundleError, match="lane"):
        parse_manifest(data)


def test_fused_only_bundle_refuses_the_split_plan(zoo, tmp_path):
    from edge.config import ExportOptions
    from edge.progress import Progress
    from edge.export.pipeline import export_model

    out = tmp_path / "fused-only"
    export_model(zoo.folder("llama"), out, ExportOptions(chunk_length=CHUNK, max_context=64, plans=("fused",)),
                 Progress(enabled=False))
    assert not any(p.name.startswith("split.") for p in out.iterdir())
    with pytest.raises(BundleError, match="no prefill plan 'split'"):
        Model.load(out, plan="split")


def test_edge_run_devices_trace_and_errors(cli, zoo, tmp_path):
    out = cli("edge.runtime.cli", "--devices")
    assert out.returncode == 0 and "cpu" in out.stdout and "CPUExecutionProvider" in out.stdout
    bundle = zoo.bundle("llama", CHUNK)
    trace = tmp_path / "trace.json"
    out = cli("edge.runtime.cli", bundle, "--prompt", "hello there", "--max-new-tokens", "4", "--accelerator", "cpu",
              "--trace", trace, "--stats")
    assert out.returncode == 0, out.stderr
    assert "bubbles" in out.stderr
    assert any(e.get("ph") == "X" for e in json.loads(trace.read_text())["traceEvents"])
    out = cli("edge.runtime.cli", bundle, "--prompt", "hi", "--plan", "split", "--accelerator", "cuda-nope")
    assert out.returncode == 1 and "not available here" in out.stderr


# ---------------------------------------------------------------- the real model

@pytest.mark.real
@pytest.mark.parametrize("scheme", ["fp32", "w8a8"])
def test_real_smollm2_split_tokens_match_fused(tmp_path_factory, scheme):
    """The real SmolLM2-135M: the two-lane plan's logits equal the fused plan's, bit for bit
    (attention reads the same static cache rows, onnxruntime picks the same kernels)."""
    from edge.config import ExportOptions
    from edge.progress import Progress
    from edge.export.pipeline import export_model
    from edge.export.quant.recipe import AccuracySpec, CalibrationSpec
    from edge.export.quant.plan import QuantOptions

    out = tmp_path_factory.mktemp(f"smollm2-split-{scheme}") / "bundle"
    quant = QuantOptions(prefill="w8a8", decode="int8") if scheme == "w8a8" else None
    export_model("smollm2-135m", out, ExportOptions(chunk_length=128, max_context=512), Progress(enabled=False),
                 quant=quant, calibration=CalibrationSpec(tokens=4096, window=512), accuracy=AccuracySpec(enabled=False))
    fused = Model.load(out, threads=2, verify_hashes=False, plan="fused")
    split = Model.load(out, plan="split", accelerator="cpu", verify_hashes=False)
    from pydoc_data.topics import topics

    for key in ("if", "with"):
        ids = fused.tokenizer.encode(topics[key])[:300]  # 3 chunks, the last one partial
        a = fused.prefill(fused.embed(ids), fused.new_cache(), all_logits=True)
        b = split.prefill(split.embed(ids), split.new_cache(), all_logits=True)
        np.testing.assert_array_equal(b, a)
        assert list(split.generate_ids(ids, 16)) == list(fused.generate_ids(ids, 16))
    answer = split.generate("What is the capital of France?", max_new_tokens=24)
    assert answer == fused.generate("What is the capital of France?", max_new_tokens=24)
    # the float model's first answer token is a near tie ("The" vs "L", docs/quantization.md): with
    # this test's small calibration (4k tokens) the W8A8 answer may start "L'Étoile"; the default
    # budget answers Paris (tests/test_real_quant.py, the README's quick start)
    assert "Paris" in answer or scheme == "w8a8", answer

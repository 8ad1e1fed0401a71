"""The split plan's accelerator subgraphs on Qualcomm's QNN execution provider, for real.

On x86_64 the ``onnxruntime-qnn`` wheel ships the Hexagon HTP *simulator* (on an aarch64 board the
same package drives the NPU). Sessions are created with CPU fallback disabled, so a node QNN
cannot take fails the session; profiling then shows every node ran on QNN. QNN wants QDQ node
units with quantized outputs, so the linears here come from a minimal W8A8 emitter whose outputs
are re-quantized with a static scale (u8 activations, int8 symmetric per-channel weights).

Tolerance: each accelerator output within 2 output quantization steps of the CPU EP's result on
the same graph (the HTP rounds its int32 accumulators differently). End to end (2 layers, 21
tokens), the split prefill with QNN on the accelerator lane differs from the same bundle on CPU
lanes by less than a third of what the (crude) W8A8 quantization itself moves the logits from the
float model (mean absolute difference; measured: ~0.12 vs ~0.56, logits std 1.6).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")

import onnxruntime as ort  # noqa: E402

from edge.config import ExportOptions  # noqa: E402
from edge.progress import Progress  # noqa: E402
from edge.runtime import Model  # noqa: E402
from edge.runtime.lanes import Device, Lane, list_devices, qnn_ep_devices  # noqa: E402
from conftest import unfused_options  # noqa: E402

CHUNK = 16
ACCEL_STAGES = ("qkv", "o_proj", "gate_up", "down")
STAGE_LINEARS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o_proj": ["self_attn.o_proj"],
                 "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}


class MinimalQDQLinear:
    """W8A8 QDQ linear ending in Q/DQ: QuantizeLinear(x) -> DQ -> MatMul <- DQ(int8 W^T, per column)
    -> QuantizeLinear -> DQ. Static scales: the input clipped at ``in_clip``; the output from a
    random-normal calibration of this weight (inputs ~ N(0, 1), as the tests feed)."""

    def __init__(self, in_clip: float = 4.0, seed: int = 0):
        self.in_clip, self.rng = in_clip, np.random.default_rng(seed)
        self.out_scales: dict[str, float] = {}

    @staticmethod
    def _qdq(g, x: str, tag: str, scale: float, wide: bool = False) -> str:
        """Q/DQ pair, uint8 (zero point 128) or, ``wide``, uint16 (32768): 16-bit types need the
        com.microsoft ops below opset 21 (as onnxruntime's own quantizer writes them, and QNN reads them)."""
        s = g.const(f"{tag}/scale", np.array(scale, np.float32))
        z = g.const(f"{tag}/zero_point", np.array(32768, np.uint16) if wide else np.array(128, np.uint8))
        dom = {"domain": "com.microsoft"} if wide else {}
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, z], name=f"{tag}/q", **dom), s, z],
                    name=f"{tag}/dq", **dom)

    def _linear(self, g, xd: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> tuple[str, float]:
        """MatMul with DQ(int8 W^T per column) (+ bias), and the output range a random-normal
        calibration of this weight gives."""
        ws = (np.abs(weight).max(1) / 127).astype(np.float32)
        wq = np.clip(np.round(weight / ws[:, None]), -127, 127).astype(np.int8)
        wd = g.op("DequantizeLinear", [g.weight(name + ".w8t", np.ascontiguousarray(wq.T)), g.weight(name + ".w8s", ws),
                                       g.weight(name + ".w8z", np.zeros(ws.shape, np.int8))], name=f"{name}/w_dq", axis=1)
        y = g.op("MatMul", [xd, wd], name=name)
        if bias is not None:
            y = g.op("Add", [y, g.weight(name + ".bias", bias)], name=f"{name}/bias")
        calib = self.rng.normal(0, 1, (256, weight.shape[1])).astype(np.float32) @ weight.T
        return y, float(np.abs(calib).max() * 1.5)

    def __call__(self, g, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        y, out_range = self._linear(g, self._qdq(g, x, f"{name}/in", self.in_clip / 127), name, weight, bias)
        self.out_scales[name] = scale = out_range / 127
        return self._qdq(g, y, f"{name}/out", scale)


@pytest.fixture(scope="module")
def qdq_bundle(zoo, tmp_path_factory):
    """The tiny LLaMA exported with every linear in the QDQ form above (fused and split plans).
    The exporter's own W8A8 (edge.export.quant) ends its linears in a float MatMul output, which the
    CPU EP fuses best and QNN refuses; this emitter replaces the float export's linears instead."""
    import edge.export.pipeline as pipeline
    import edge.export.quant.recipe as quant_export
    from edge.export.graph.decoder import DecoderGraph

    emitter = MinimalQDQLinear()

    class QDQDecoder(DecoderGraph):
        def __init__(self, *args, **kwargs):
            kwargs["linear"] = emitter
            super().__init__(*args, **kwargs)

    out = tmp_path_factory.mktemp("qnn") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_export, "DecoderGraph", QDQDecoder)  # the float export's graph builder
        pipeline.export_model(zoo.folder("llama"), out, ExportOptions(chunk_length=CHUNK, max_context=64),
                              Progress(enabled=False))
    return out, emitter


def test_qnn_is_listed():
    qnn = [d for d in list_devices() if d.name == "qnn"]
    assert qnn and qnn[0].provider == "QNNExecutionProvider"
    assert qnn_ep_devices()


def test_accelerator_subgraphs_run_entirely_on_qnn(qdq_bundle, tmp_path):
    from edge.manifest import read_manifest

    bundle, emitter = qdq_bundle
    m = read_manifest(bundle)
    qnn = Lane("accel", Device("qnn", "QNNExecutionProvider", "npu"))
    rng = np.random.default_rng(0)
    checked = 0
    for stage in m.plans.split.stages:
        if stage.lane != "accel":
            continue
        assert stage.name in ACCEL_STAGES
        for key in stage.graphs:
            path = bundle / m.graphs[key].file
            so = qnn.options()  # CPU fallback disabled: a node QNN cannot run fails the session
            assert so.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
            so.enable_profiling = True
            so.profile_file_prefix = str(tmp_path / key)
            sess = ort.InferenceSession(str(path), so)
            feeds = {i.name: rng.normal(0, 1, i.shape).astype(np.float32) for i in sess.get_inputs()}
            got = sess.run(None, feeds)
            nodes = [e for e in json.loads(open(sess.end_profiling()).read()) if e.get("cat") == "Node"]
            assert nodes and {e["args"]["provider"] for e in nodes} == {"QNNExecutionProvider"}, key
            # the reference: the QDQ graph's own arithmetic, unfused (with fusions the CPU EP runs
            # MLAS's u8s8 GEMM, which saturates int16 pair sums on CPUs without VNNI: 6 output
            # steps off on an AVX2-only machine, 2026-12-02)
            ref = ort.InferenceSession(str(path), unfused_options(), providers=["CPUExecutionProvider"]).run(None, feeds)
            layer = key.rsplit(".", 1)[1]
            for out, want, name in zip(got, ref, STAGE_LINEARS[stage.name]):
                step = emitter.out_scales[f"model.layers.{layer}.{name}"]
                assert np.abs(out - want).max() <= 2 * step + 1e-6, (key, name, np.abs(out - want).max() / step)
                assert np.abs(want).max() > 20 * step  # the outputs are not all in the first few steps
            checked += 1
    assert checked == 4 * m.model.num_layers


def test_split_prefill_with_qnn_lane_matches_cpu_lanes(qdq_bundle, zoo):
    bundle, _ = qdq_bundle
    fp32 = zoo.model("llama", CHUNK)  # the same weights, float
    on_qnn = Model.load(bundle, plan="split", accelerator="qnn", verify_hashes=False)
    assert on_qnn.split_prefill.lanes["accel"].device.name == "qnn"
    assert not on_qnn.split_prefill.flexible  # a real accelerator: affinity decides
    # the CPU lanes unfused: the QDQ arithmetic itself (fused, the CPU EP's u8s8 GEMM saturates int16
    # pair sums on CPUs without VNNI, and the CPU lanes were further from QNN than from float on an
    # AVX2-only machine, 2026-12-02)
    import edge.runtime.lanes as lanes_module
    import edge.runtime.model as model_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lanes_module, "session_options", unfused_options)
        mp.setattr(model_module, "session_options", unfused_options)
        on_cpu = Model.load(bundle, plan="split", accelerator="cpu", verify_hashes=False)
    ids = np.random.default_rng(7).integers(0, 300, CHUNK + 5).tolist()  # two chunks, the last partial
    a = on_qnn.prefill(on_qnn.embed(ids), on_qnn.new_cache(), all_logits=True)
    b = on_cpu.prefill(on_cpu.embed(ids), on_cpu.new_cache(), all_logits=True)
    ref = fp32.prefill(fp32.embed(ids), fp32.new_cache(), all_logits=True)
    assert np.abs(a - b).mean() < np.abs(b - ref).mean() / 3
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    lanes_of = {e.stage: e.lane for e in on_qnn.split_prefill.last_trace.events}
    assert all(lanes_of[s] == "accel" for s in ACCEL_STAGES)
    assert all(lane == "cpu" for s, lane in lanes_of.items() if s not in ACCEL_STAGES)


class PlanQDQLinear(MinimalQDQLinear):
    """The exporter's own plan (a calibrated export's static scales and activation bits) in QNN's
    native QDQ form: an 8-bit group's input as uint8 (zero point 128, its scale), a 16-bit group's
    as uint16 (zero point 32768, the same range) in one pass, where the CPU EP's form takes two
    int8 passes; int8 weights per output channel; the output in the input's width (the HTP
    simulator refuses a uint16 input with a uint8 output and the reverse)."""

    def __init__(self, plans):
        super().__init__()
        self.plans = plans

    def __call__(self, g, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        act = self.plans[name].act
        wide = act.bits == 16
        lo, hi = act.bounds
        y, out_range = self._linear(g, self._qdq(g, x, f"{name}/in", (hi - lo) / 65535 if wide else act.scale, wide),
                                    name, weight, bias)
        self.out_scales[name] = scale = out_range / (32767 if wide else 127)
        return self._qdq(g, y, f"{name}/out", scale, wide)


def test_plan_with_16bit_activations_runs_entirely_on_qnn(zoo, tmp_path):
    """A real calibration and plan (16-bit inputs at q/k/v, o and down by default, 8-bit at
    gate/up), its accelerator subgraphs in QNN's form: every one runs fully on the simulated HTP.
    Reference: the same graph on the CPU EP without graph optimizations (plain Q/DQ/MatMul
    arithmetic; with them its u16 path is the less exact one). 8-bit outputs within 2 steps; 16-bit
    ones within a quarter of the 8-bit step of the same range (measured on one linear: 24 16-bit
    steps = 0.09 of an 8-bit step; the HTP's A16W8 arithmetic is not exact, but 10x finer)."""
    import edge.export.pipeline as pipeline
    from edge.export.quant.plan import QuantOptions
    from edge.export.quant.recipe import AccuracySpec, CalibrationSpec
    from edge.manifest import read_manifest

    plans, real = {}, pipeline.decoders
    emitter = PlanQDQLinear(plans)

    def qnn_decoders(cfg, weights, store, max_context, quant, plan, blocks=None):
        plans.update(plan.linears())
        parts = real(cfg, weights, store, max_context, quant, plan, blocks)
        parts.prefill.emit_linear = emitter  # what the split plan's accelerator subgraphs are cut from
        return parts

    out = tmp_path / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "decoders", qnn_decoders)
        pipeline.export_model(zoo.folder("llama"), out, ExportOptions(chunk_length=CHUNK, max_context=64,
                                                                      plans=("fused", "split")),
                              Progress(enabled=False), quant=QuantOptions("w8a8"),
                              calibration=CalibrationSpec(tokens=512, window=64), accuracy=AccuracySpec(enabled=False))
    assert {lq.act.bits for lq in plans.values()} == {8, 16}  # the default plan mixes both
    m = read_manifest(out)
    qnn = Lane("accel", Device("qnn", "QNNExecutionProvider", "npu"))
    rng = np.random.default_rng(1)
    ran = 0
    for stage in (s for s in m.plans.split.stages if s.lane == "accel"):
        for key in stage.graphs:
            path = out / m.graphs[key].file
            so = qnn.options()
            so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / key)
            sess = ort.InferenceSession(str(path), so)
            feeds = {i.name: rng.normal(0, 1, i.shape).astype(np.float32) for i in sess.get_inputs()}
            got = sess.run(None, feeds)
            nodes = [e for e in json.loads(open(sess.end_profiling()).read()) if e.get("cat") == "Node"]
            assert nodes and {e["args"]["provider"] for e in nodes} == {"QNNExecutionProvider"}, key
            plain = ort.SessionOptions()
            plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            want = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]).run(None, feeds)
            layer = key.rsplit(".", 1)[1]
            for o, w, name in zip(got, want, STAGE_LINEARS[stage.name]):
                full = f"model.layers.{layer}.{name}"
                step = emitter.out_scales[full]
                tol = 2 * step if plans[full].act.bits == 8 else 0.25 * step * 32767 / 127
                assert np.abs(o - w).max() <= tol + 1e-6, (key, name, np.abs(o - w).max() / step)
                assert np.abs(w).max() > 20 * step
            ran += 1
    assert ran == 4 * m.model.num_layers

"""The real SmolLM2-135M exported W8A8 (static int8 activations + float side path for hot
channels, int8 decode): it still answers, its held-out perplexity stays close to float, its
bundle is small, its decode head is fused. A reduced budget (8k calibration tokens, 2k held-out
tokens) keeps it to about 80 s on 2 cores; the full figures (32k / 8k) are in docs/quantization.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


pytestmark = pytest.mark.real

# measured at this budget (2026-11-23): W8A8 -0.26% (float 8.520, quantized 8.498 over 2048 tokens),
# decode int8 -0.21%, hot channels 0.4995% (--act16 auto 0.25: +1.49%); the default export (32k
# calibration, 8192 held-out tokens) reads +0.36% / +0.30% (docs/quantization.md). Plain static
# per-tensor int8 is +58% and w8a8-nooutliers +3.3%, so the 1% bound still catches a
# broken side path or smoothing.
MAX_CHANGE_PERCENT = 1.0
OFF_DOMAIN_REDUCED_BUDGET = 1.5  # measured 2026-12-02 at this budget: changelog +1.20%


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    from edge.config import ExportOptions
    from edge.progress import Progress
    from edge.export.pipeline import export_model
    from edge.export.quant.recipe import AccuracySpec, CalibrationSpec
    from edge.export.quant.plan import QuantOptions

    out = tmp_path_factory.mktemp("smollm2-w8a8") / "bundle"
    manifest = export_model("smollm2-135m", out, ExportOptions(chunk_length=128, max_context=1024, plans=("fused",)),
                            Progress(enabled=False), quant=QuantOptions("w8a8"),
                            calibration=CalibrationSpec(tokens=8192, window=512),
                            accuracy=AccuracySpec(tokens=2048, window=1024))
    return out, manifest


def test_quantized_smollm2_answers_paris(w8a8):
    out, _ = w8a8
    r = subprocess.run([sys.executable, "-m", "edge.runtime.cli", str(out), "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_quantized_smollm2_decode_head_is_fused(w8a8, tmp_path):
    """The tied int8 output projection of the decode graph runs as MatMulNBits (over row parts
    of HEAD_PART_ROWS, joined by one Concat): nothing is dequantized per step (unfused: 46
    ms/step instead of 9 on 2 threads)."""
    import onnx
    import onnxruntime as ort

    from edge.runtime.sessions import session_options

    out, manifest = w8a8
    so = session_options(2)
    so.optimized_model_filepath = str(tmp_path / "decode_opt.onnx")
    ort.InferenceSession(str(out / "decode.onnx"), so, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "decode_opt.onnx"), load_external_data=False).graph.node
    from edge.export.graph.cpu_decoder import HEAD_PART_ROWS

    head = [n.op_type for n in nodes if n.name == "lm_head" or n.name.startswith("lm_head/rows")]
    parts = -(-manifest.model.vocab_size // HEAD_PART_ROWS)
    assert head == ["MatMulNBits"] * parts + ["Concat"], head
    assert "DequantizeLinear" not in {n.op_type for n in nodes}


def test_quantized_smollm2_perplexity_and_budget(w8a8):
    out, manifest = w8a8
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    acc = q["accuracy"]
    pydoc = acc["fused"]["pydoc-heldout"]
    assert pydoc["tokens"] == 2048 and pydoc["float"] < 15  # the float model itself is sane
    change = {t: r["change_percent"] for t, r in acc["fused"].items() if "skipped" not in r}
    assert change["pydoc-heldout"] < MAX_CHANGE_PERCENT, change
    # the other texts at this reduced budget (8k calibration tokens, 2k per text: the first two
    # windows) read higher than the default export's 8k per text (+0.88% / +0.58%, docs/quantization.md)
    assert all(c < OFF_DOMAIN_REDUCED_BUDGET for c in change.values()), change
    assert q["hot_fraction"] <= 0.005  # hot channels kept in float: at most 0.5% of linear inputs
    assert acc["decode_weights"]["change_percent"] < MAX_CHANGE_PERCENT, acc
    size = sum(r["size"] for r in manifest.files.values())
    assert size < 0.3 * 540e6  # the float bundle is ~540 MB

"""The real SmolLM2-135M exported W8A8 (static int8 activations + float side path for hot
channels, int8 decode): it still answers, its held-out perplexity stays close to float, its
bundle is small. A reduced budget (8k calibration tokens, 2k held-out tokens) keeps it to a few
minutes on 2 cores; the full figures (32k / 8k) are in the issue's report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

# measured at this budget: about +1.5% (the default export: about +1.0% over 8192 tokens);
# plain per-tensor static int8 is +58% and the bound would catch a broken side path or smoothing
MAX_CHANGE_PERCENT = 3.0


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    from edge.config import ExportOptions
    from edge.progress import Progress
    from export.pipeline import export_model
    from export.quant_export import AccuracySpec, CalibrationSpec
    from export.quantize import QuantOptions

    out = tmp_path_factory.mktemp("smollm2-w8a8") / "bundle"
    manifest = export_model("smollm2-135m", out, ExportOptions(chunk_length=128, max_context=1024, plans=("fused",)),
                            Progress(enabled=False), quant=QuantOptions("w8a8"),
                            calibration=CalibrationSpec(tokens=8192, window=512),
                            accuracy=AccuracySpec(tokens=2048, window=1024))
    return out, manifest


def test_quantized_smollm2_answers_paris(w8a8):
    out, _ = w8a8
    r = subprocess.run([sys.executable, "-m", "runtime.cli", str(out), "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_quantized_smollm2_perplexity_and_budget(w8a8):
    out, manifest = w8a8
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    acc = q["accuracy"]
    assert acc["tokens"] == 2048 and acc["float"] < 15  # the float model itself is sane
    assert acc["change_percent"] < MAX_CHANGE_PERCENT, acc
    assert q["hot_fraction"] <= 0.005  # hot channels kept in float: at most 0.5% of linear inputs
    assert acc["decode_weights"]["change_percent"] < MAX_CHANGE_PERCENT, acc
    size = sum(r["size"] for r in manifest.files.values())
    assert size < 0.3 * 540e6  # the float bundle is ~540 MB

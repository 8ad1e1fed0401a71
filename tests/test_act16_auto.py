"""--act16 auto: which linear inputs get a second int8 pass (16-bit activations) under a budget of
multiply-adds. Tiny random LLaMA (structure only: real perplexities are in docs/quantization.md)."""

from __future__ import annotations

import json

import pytest

from edge.export.quant.calibrate import calibrate
from edge.export.families import family_for
from edge.export.quant.recipe import CalibrationSpec, calibration_windows
from edge.export.quant.plan import QuantOptions, _auto_bits, _group_macs, plan_quantization
from edge.export.sources import load_source


@pytest.fixture(scope="module")
def calibrated(zoo):
    src = load_source(zoo.folder("llama"))
    family = family_for(src.architecture)
    cfg = family.config(src.hf_config, src.special_tokens)
    weights = family.sanitize(src.weights, cfg)
    wins = calibration_windows(src.tokenizer_json, None, CalibrationSpec(tokens=512, window=128))
    return cfg, weights, calibrate(cfg, weights, [ids for _, ids in wins], chunk=16)


def _bits(calibrated, budget: float) -> dict[str, int]:
    cfg, weights, cal = calibrated
    bits, _ = _auto_bits(cal, weights, QuantOptions(act16=("auto",), act16_budget=budget), cfg.head_dim)
    return bits


def test_budget_bounds_the_second_passes(calibrated):
    _, weights, cal = calibrated
    macs = {k: _group_macs(cal, k, weights) for k in cal.groups}
    total = sum(macs.values())
    assert set(_bits(calibrated, 0.0).values()) == {8}
    assert all(b == 16 for k, b in _bits(calibrated, 1.0).items() if macs[k])
    for budget in (0.2, 0.5):
        bits = _bits(calibrated, budget)
        used = sum(macs[k] for k, b in bits.items() if b == 16)
        assert 0 < used <= budget * total
        # greedy over all groups: none left out would still have fit in what remains
        assert all(macs[k] > budget * total - used for k, b in bits.items() if b == 8 and macs[k])


def test_chosen_groups_are_the_best_gain_per_multiply_add(calibrated):
    """With room for one group only, auto takes the one whose 16-bit curve lowers the estimated
    noise-to-signal ratio most per multiply-add; the plan records it as 16 bits, with a lower
    estimate than its 8-bit plan."""
    cfg, weights, cal = calibrated
    macs = {k: _group_macs(cal, k, weights) for k in cal.groups}
    smallest = min(m for m in macs.values() if m)
    budget = smallest / sum(macs.values())
    bits = _bits(calibrated, budget)
    (chosen,) = [k for k, b in bits.items() if b == 16]
    assert macs[chosen] == smallest
    auto = plan_quantization(cal, weights, QuantOptions(act16=("auto",), act16_budget=budget), cfg.head_dim)
    plain = plan_quantization(cal, weights, QuantOptions(act16=()), cfg.head_dim)
    by_key = {g.key: g for g in auto.groups}
    assert by_key[chosen].bits == 16 and sum(g.bits == 16 for g in auto.groups) == 1
    assert by_key[chosen].nsr < {g.key: g for g in plain.groups}[chosen].nsr


def test_options_reject_a_bad_budget_or_auto_mixed_with_kinds():
    with pytest.raises(ValueError, match="--act16-budget"):
        QuantOptions(act16=("auto",), act16_budget=1.5)
    with pytest.raises(ValueError, match="auto"):
        QuantOptions(act16=("auto", "q_proj"))


def test_cli_act16_auto_reaches_the_manifest(zoo, cli, tmp_path):
    out = tmp_path / "b"
    r = cli("edge.export.cli", zoo.folder("llama"), "-o", out, "--chunk", "16", "--context", "64", "--quant", "w8a8",
            "--calib-tokens", "256", "--no-accuracy-report", "--act16", "auto", "--act16-budget", "0.3")
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "manifest.json").read_text())["quantization"]
    assert rec["options"]["act16"] == ["auto"] and rec["options"]["act16_budget"] == 0.3
    assert {g["bits"] for g in rec["groups"].values()} == {8, 16}

"""The pure out-of-order planner (edge.runtime.scheduler.plan): no models, no onnxruntime sessions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.runtime.scheduler import CostTable, StageInfo, build_tasks, check_schedule, schedule

# the split plan's stage sequence (export/graph/split.py)
STAGES = (
    StageInfo("pre", "cpu", False),
    StageInfo("qkv", "accel", True),
    StageInfo("attn", "cpu", True, cross_chunk=True),
    StageInfo("o_proj", "accel", True),
    StageInfo("post_attn", "cpu", True),
    StageInfo("gate_up", "accel", True),
    StageInfo("act", "cpu", True),
    StageInfo("down", "accel", True),
    StageInfo("post_mlp", "cpu", True),
    StageInfo("head", "cpu", False, optional=True),
)
# SmolLM2-135M, chunk 128, one thread per lane, in ms (measured shape; exact values do not matter)
BASE = {"pre": 0.1, "qkv": 0.7, "attn": 0.6, "o_proj": 0.4, "post_attn": 0.1, "gate_up": 2.3, "act": 0.1,
        "down": 1.1, "post_mlp": 0.1, "head": 9.0}


def costs(flexible: bool, scale: dict | None = None) -> CostTable:
    scale = scale or {}
    table = {s.name: ({"cpu": BASE[s.name], "accel": BASE[s.name] * scale.get(s.name, 1.0)} if flexible
                      else {s.lane: BASE[s.name]}) for s in STAGES}
    growth = {"attn": {ln: 0.2 for ln in table["attn"]}}
    return CostTable(table, growth)


def test_task_graph_chain_and_cross_chunk_dependencies():
    tasks, deps = build_tasks(STAGES, num_layers=3, n_chunks=2)
    per_chunk = 1 + 8 * 3
    assert len(tasks) == 2 * per_chunk + 1  # the head only on the last chunk
    attn = {(t.chunk, t.layer): t for t in tasks if t.stage == "attn"}
    for layer in range(3):
        assert attn[(0, layer)] in deps[attn[(1, layer)]]
    first = [t for t in tasks if t.chunk == 0]
    assert [t.stage for t in first[:4]] == ["pre", "qkv", "attn", "o_proj"]
    for a, b in zip(first, first[1:]):
        assert deps[b][0] == a  # chain order within a chunk
    assert [t.stage for t in tasks if t.chunk == 1][-1] == "head"
    assert sum(t.stage == "head" for t in build_tasks(STAGES, 3, 4, optional_chunks=range(4))[0]) == 4


@pytest.mark.parametrize("flexible", [False, True])
@pytest.mark.parametrize("n_chunks", [1, 2, 4, 5])
def test_plan_respects_dependencies_and_affinity(flexible, n_chunks):
    p = schedule(costs(flexible), n_chunks, STAGES, num_layers=4)
    check_schedule(p)
    tasks, _ = build_tasks(STAGES, 4, n_chunks)
    assert set(p.lane_of) == set(tasks)
    if not flexible:
        assert all(p.lane_of[t] == {s.name: s.lane for s in STAGES}[t.stage] for t in tasks)
    # lane orders are consistent with simulated times
    for ts in p.order.values():
        assert [p.start[t] for t in ts] == sorted(p.start[t] for t in ts)


def test_plan_is_deterministic():
    a = schedule(costs(True), 4, STAGES, num_layers=6)
    b = schedule(costs(True), 4, STAGES, num_layers=6)
    assert a.order == b.order and a.start == b.start


def test_one_chunk_prompt_is_a_single_chain():
    p = schedule(costs(True), 1, STAGES, num_layers=3)
    check_schedule(p)
    total = sum(p.end[t] - p.start[t] for t in p.lane_of)
    assert p.makespan == pytest.approx(total)  # nothing can overlap in one chain
    assert len(p.lane_of) == 1 + 8 * 3 + 1


def test_partial_last_chunk_and_all_logits_heads():
    # a partial last chunk is just a chunk to the planner; perplexity asks for every chunk's head
    p = schedule(costs(False), 3, STAGES, num_layers=2, optional_chunks=[0, 1, 2])
    check_schedule(p)
    assert sorted(t.chunk for t in p.lane_of if t.stage == "head") == [0, 1, 2]


def test_balancing_two_cpu_lanes_leaves_few_bubbles():
    """Where both lanes can run everything (a CPU-backed accelerator lane), four chunks fill both."""
    p = schedule(costs(True), 4, STAGES, num_layers=30)
    busy = p.busy()
    assert min(busy.values()) > 0
    assert p.makespan <= 1.10 * max(busy.values())          # bubbles under 10%
    assert p.makespan <= 0.6 * sum(busy.values())           # real overlap, near half the work


def test_fixed_affinity_keeps_the_busier_lane_fed():
    """A real NPU: affinity decides; the schedule is as long as the busier lane, plus little."""
    p = schedule(costs(False), 4, STAGES, num_layers=30)
    busy = p.busy()
    assert p.makespan <= 1.10 * max(busy.values())


def test_earliest_finish_moves_work_to_a_faster_lane():
    # the accel lane runs gate_up 4x faster than the CPU lane: it should take nearly all of them
    table = costs(True, scale={"gate_up": 0.25}).costs
    p = schedule(CostTable({k: dict(v) for k, v in table.items()}), 4, STAGES, num_layers=8)
    check_schedule(p)
    gate = [t for t in p.lane_of if t.stage == "gate_up"]
    assert sum(p.lane_of[t] == "accel" for t in gate) >= 0.8 * len(gate)


def test_a_stage_no_lane_can_run_is_an_error():
    table = {s.name: {"cpu": 1.0} for s in STAGES}
    del table["qkv"]["cpu"]
    with pytest.raises(ValueError, match="qkv"):
        schedule(CostTable(table), 2, STAGES, num_layers=2)


@settings(max_examples=40, deadline=None)
@given(n_chunks=st.integers(1, 5), layers=st.integers(1, 4), flexible=st.booleans(),
       noise=st.lists(st.floats(0.05, 20.0), min_size=len(STAGES), max_size=len(STAGES)))
def test_plan_never_violates_dependencies(n_chunks, layers, flexible, noise):
    table = {s.name: ({"cpu": w, "accel": w * 1.3} if flexible else {s.lane: w}) for s, w in zip(STAGES, noise)}
    p = schedule(CostTable(table, {"attn": {ln: 0.1 for ln in table["attn"]}}), n_chunks, STAGES, layers)
    check_schedule(p)
    assert len(p.lane_of) == n_chunks * (1 + 8 * layers) + 1
    # the one queue the lanes take tasks from: every task once, in planned start order
    assert sorted(p.tasks) == sorted(p.lane_of) and [p.start[t] for t in p.tasks] == sorted(p.start.values())

"""The one place onnxruntime sessions are made: options, creation, and the one-line error that
names the graph file when onnxruntime cannot load it."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

from edge.budget import check_threads
from edge.errors import BundleError
from edge.manifest import GraphSpec

CPU = ("CPUExecutionProvider",)
# graphs whose MatMuls are Q/DQ patterns that the CPU EP fuses into its u8s8 GEMM: the static
# W8A8 prefill schemes and the CPU plan's int8dyn linears (dynamic activation scales)
INT8_GEMM_GRAPHS = ("w8a8", "w8a8-nooutliers", "int8dyn")


@functools.cache
def int8_gemm_saturates() -> bool:
    """x86-64 without VNNI: MLAS's u8s8 GEMM (what the CPU EP fuses a static Q/DQ MatMul into) adds
    pairs of u8 x s8 products in int16 with saturation (vpmaddubsw). Seen on an AVX2-only AMD EPYC
    on 2026-12-02: a W8A8 linear 0.46 off its reference on 2.5% of outputs, the real W8A8 bundle's
    perplexity over its bound. ARM (SDOT/I8MM) and VNNI CPUs are exact. ``EDGE_INT8_GEMM_SATURATES``
    = 1 / 0 overrides the detection (an emulated CPU's /proc/cpuinfo shows the host's flags)."""
    forced = os.environ.get("EDGE_INT8_GEMM_SATURATES")
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return not flags & {"avx512_vnni", "avx_vnni"}


def unfuse_int8(kind: str) -> bool:
    """Whether graphs of this kind (a prefill scheme, or the CPU plan's linears) must open with
    ``qdq_unfused`` on this CPU."""
    return kind in INT8_GEMM_GRAPHS and int8_gemm_saturates()


def qdq_unfused(so: ort.SessionOptions) -> ort.SessionOptions:
    """``so`` with onnxruntime's Q/DQ fusions off: an int8-GEMM graph then runs its own arithmetic
    (DQ -> float MatMul -> Q), exact where the fused u8s8 GEMM would saturate; slower (static
    W8A8: the weights are dequantized on every call; int8dyn: folded into a float copy at load),
    which is why the runtime only does it there (docs/cpu_plan.md)."""
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def session_options(threads: int, arena: bool = True) -> ort.SessionOptions:
    """``threads`` 0 = onnxruntime's default (one per core); ``arena=False`` where many small
    sessions would each keep their own peak (the split plan's lanes)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = check_threads(threads, "threads")  # 0 = onnxruntime's default
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    return so


def open_session(path: Path | str, options: ort.SessionOptions, providers: Sequence[str] | None = CPU,
                 spec: GraphSpec | None = None, who: str = "onnxruntime") -> ort.InferenceSession:
    """An InferenceSession of ``path``; with ``spec``, its inputs/outputs checked against the
    manifest's record. ``who`` names the loader in the error (e.g. a lane)."""
    try:
        sess = ort.InferenceSession(str(path), options, providers=list(providers) if providers else None)
    except Exception as e:  # onnxruntime raises its own types; name the file
        raise BundleError(f"{path}: {who} cannot load this graph ({str(e)[:400]})") from None
    if spec is not None:
        from edge.runtime.bundle import check_session_io

        check_session_io(sess, spec, str(path))
    return sess

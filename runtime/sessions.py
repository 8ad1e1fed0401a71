"""The one place onnxruntime sessions are made: options, creation, and the one-line error that
names the graph file when onnxruntime cannot load it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import onnxruntime as ort

from edge.budget import check_threads
from edge.errors import BundleError
from edge.manifest import GraphSpec

CPU = ("CPUExecutionProvider",)


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

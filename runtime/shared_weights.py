"""One copy of the bundle's weights for every onnxruntime session.

Each ``InferenceSession`` reads a graph's external initializers into its own memory, so the
embed, prefill and decode graphs of a float bundle hold three copies of weights.bin (1.2 GB for
SmolLM2-135M). Here each weight file is memory-mapped once, read-only, and every session gets the
same buffers through ``SessionOptions.add_initializer``: the pages are the file's, shared, and the
kernel can drop them under memory pressure.

The graph's initializer records (name, dtype, dims, location, offset, length) are read from the
ONNX protobuf with ``onnx_refs`` (no ``onnx`` on a board) and checked against the file before any
buffer is handed over: a record that does not fit the file is refused, never read out of bounds.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.errors import BundleError

from edge.runtime.onnx_refs import Malformed, fields, read_graph_file, text, varint

# TensorProto.DataType -> numpy
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
           9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
SHARED_DTYPES = (1, 10)  # float32, float16
_MIN_BYTES = 128  # onnxruntime wants pre-allocated initializers of at least 128 bytes


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    dtype: int
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int


def _varints(buf, start: int, stop: int) -> list[int]:
    out, pos = [], start
    while pos < stop:
        v, pos = varint(buf, pos, stop)
        out.append(v)
    return out


def _tensor(buf, start: int, stop: int) -> ExternalTensor | None:
    name, dtype, dims, ext, external = "", 0, [], {}, False
    for number, wire, s, e in fields(buf, start, stop):
        if number == 1:  # dims: packed or one varint per field
            dims += _varints(buf, s, e) if wire == 2 else [varint(buf, s, e)[0]]
        elif number == 2 and wire == 0:
            dtype = varint(buf, s, e)[0]
        elif number == 8 and wire == 2:
            name = text(buf, s, e)
        elif number == 14 and wire == 0:  # data_location: 1 = EXTERNAL
            external = varint(buf, s, e)[0] == 1
        elif number == 13 and wire == 2:
            key = value = ""
            for n2, w2, s2, e2 in fields(buf, s, e):
                if w2 == 2 and n2 == 1:
                    key = text(buf, s2, e2)
                elif w2 == 2 and n2 == 2:
                    value = text(buf, s2, e2)
            ext[key] = value
    if not (external or "location" in ext) or "location" not in ext:
        return None
    try:
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
    except (KeyError, ValueError):
        raise Malformed(f"tensor {name!r}: external data needs integer offset and length") from None
    return ExternalTensor(name, dtype, tuple(dims), ext["location"], offset, length)


def external_initializers(path: Path) -> list[ExternalTensor]:
    """The top-level graph initializers of an ONNX file that live in external files."""

    def scan(buf, size: int) -> list[ExternalTensor]:
        out = []
        for number, wire, s, e in fields(buf, 0, size):
            if number == 7 and wire == 2:  # ModelProto.graph
                for n2, w2, s2, e2 in fields(buf, s, e):
                    if n2 == 5 and w2 == 2 and (t := _tensor(buf, s2, e2)) is not None:  # GraphProto.initializer
                        out.append(t)
        return out

    return read_graph_file(path, scan)


def check_fits(graph: Path, t: ExternalTensor, file_size: int) -> None:
    """Refuse a record that reads outside its file or whose length is not its shape's."""
    want = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(_DTYPES[t.dtype]).itemsize
    if t.length != want or t.offset < 0 or t.offset + t.length > file_size:
        raise BundleError(f"{graph}: tensor {t.name!r} external data (offset {t.offset}, length {t.length}) "
                          f"does not fit {t.location} ({file_size} bytes) or its shape {list(t.dims)}")


class SharedWeights:
    """Memory maps of a bundle's weight files and the OrtValues over them, shared by all sessions."""

    def __init__(self, bundle_dir: Path):
        self.dir = bundle_dir
        self._maps: dict[str, np.ndarray] = {}
        self._values: dict[tuple, ort.OrtValue] = {}

    def _file(self, location: str) -> np.ndarray:
        if location not in self._maps:
            path = self.dir / location  # location was checked against the manifest (bundle.check_external_data)
            with open(path, "rb") as f:
                self._maps[location] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        return self._maps[location]

    def value(self, graph: Path, t: ExternalTensor) -> ort.OrtValue | None:
        key = (t.location, t.offset, t.length, t.dtype, t.dims)
        if key not in self._values:
            dtype = _DTYPES.get(t.dtype)
            if dtype is None or t.length < _MIN_BYTES:
                return None  # onnxruntime reads it itself
            data = self._file(t.location)
            check_fits(graph, t, data.size)
            if t.offset % np.dtype(dtype).itemsize:
                return None  # unaligned: let onnxruntime copy it
            arr = data[t.offset:t.offset + t.length].view(dtype).reshape(t.dims)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(arr)
        return self._values[key]

    def session_options(self, graph: Path, base: ort.SessionOptions) -> ort.SessionOptions:
        """``base``'s settings plus this graph's external initializers from the shared maps. Prepacking
        is off: a prepacked copy per session is exactly the duplicate this avoids (prefill speed
        measured unchanged, decode ~10% slower on float weights)."""
        so = clone_options(base)
        tensors = external_initializers(graph)
        floats = [t for t in tensors if t.dtype in SHARED_DTYPES]
        # int8/int4 weights feed Q/DQ fusions that build their own tensors at load (and want prepacking):
        # sharing them only adds mapped pages. Share where float weights, read as they are by
        # Gemm/MatMul, are the bulk of the graph.
        if sum(t.length for t in floats) * 2 < sum(t.length for t in tensors):
            return so
        for t in floats:
            if (v := self.value(graph, t)) is not None:
                so.add_initializer(t.name, v)
        so.add_session_config_entry("session.disable_prepacking", "1")
        return so


def clone_options(base: ort.SessionOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    for attr in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "log_severity_level",
                 "execution_mode", "enable_cpu_mem_arena", "enable_mem_pattern"):
        setattr(so, attr, getattr(base, attr))
    return so


def _libc():
    """The C library through ctypes (OSError where there is none to load)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc). onnxruntime's graph optimizations build
    float temporaries while fusing int8 weights at load; freed, they still count as resident
    (1.6 GB -> 0.4 GB after loading the W8A8 SmolLM2 bundle). Elsewhere (musl, macOS) a no-op."""
    import ctypes

    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(files: list[Path]) -> int:
    """Unmap the resident pages of this process's mappings of ``files`` (the bundle's weight files)
    that hold no page of their own; returns the bytes of the ranges advised. onnxruntime keeps each
    MatMulNBits' scales and zero points mapped after copying them into its packed weights (20 MiB
    of an int4 bundle stayed resident, never read again). A mapping whose smaps shows no anonymous
    (copied-on-write) page holds only the file's clean pages: whatever reads them later faults
    them back in from the page cache, so this changes memory, never results. Call it while no
    session runs. Linux only (elsewhere a no-op)."""
    import ctypes

    names = {str(Path(f).resolve()) for f in files}
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
        madvise = _libc().madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    clean: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = (start, end) if len(head) == 6 and head[5] in names else None
        elif current is not None and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0:
                clean.append(current)
            current = None
    advised = 0
    for start, end in clean:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised

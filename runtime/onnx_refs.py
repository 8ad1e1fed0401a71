"""Which external-data files an ONNX graph reads, found without the ``onnx`` package.

The runtime must know, before onnxruntime opens a graph, that every tensor stored outside the
graph file points at a file of the bundle (listed, hashed, inside the folder). A board has no
``onnx`` package, so this module walks the protobuf wire format itself, descending only into the
messages that can hold tensors:

    ModelProto.graph(7) / .functions(25) / .training_info(20)
    GraphProto.node(1) / .initializer(5) / .sparse_initializer(15)
    NodeProto.attribute(5); FunctionProto.node(7); TrainingInfoProto.initialization(1) / .algorithm(2)
    AttributeProto.t(5) / .g(6) / .tensors(10) / .graphs(11) / .sparse_tensor(22) / .sparse_tensors(23)
    SparseTensorProto.values(1) / .indices(2)
    TensorProto.name(8) / .external_data(13) -> StringStringEntryProto.key(1) / .value(2)

Everything else is skipped by its length, so a graph file of any size is scanned in a few ms.
Malformed input raises BundleError (never IndexError, RecursionError, ...).
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edge.errors import BundleError

_MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); real graphs use a handful

# message kind -> {field number: child message kind}
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, start, stop) of each field in buf[pos:end]; payload = buf[start:stop]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            start = pos
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            start, pos = pos, pos + 8
        elif wire == 5:
            start, pos = pos, pos + 4
        elif wire == 2:
            length, start = _varint(buf, pos, end)
            pos = start + length
        else:  # 3/4 (groups) never appear in ONNX; 6/7 do not exist
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("field runs past the end of its message")
        yield number, wire, start, pos


def _text(buf, start: int, stop: int) -> str:
    try:
        return bytes(buf[start:stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a string is not valid UTF-8") from None


def _tensor_refs(buf, start: int, stop: int, out: list[tuple[str, str]]) -> None:
    name, locations = "", []
    for number, wire, s, e in _fields(buf, start, stop):
        if wire != 2:
            continue
        if number == 8:
            name = _text(buf, s, e)
        elif number == 13:
            key = value = None
            for n2, w2, s2, e2 in _fields(buf, s, e):
                if w2 == 2 and n2 == 1:
                    key = _text(buf, s2, e2)
                elif w2 == 2 and n2 == 2:
                    value = _text(buf, s2, e2)
            if key == "location":
                locations.append(value or "")
    out.extend((name, loc) for loc in locations)


def _walk(buf, kind: str, start: int, stop: int, depth: int, out: list[tuple[str, str]]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed(f"graphs nested deeper than {_MAX_DEPTH} levels")
    if kind == "tensor":
        _tensor_refs(buf, start, stop, out)
        return
    children = _CHILDREN[kind]
    for number, wire, s, e in _fields(buf, start, stop):
        child = children.get(number)
        if child is not None and wire == 2:
            _walk(buf, child, s, e, depth + 1, out)


def read_graph_file(path: str | Path, scan):
    """``scan(buffer, size)`` over the memory-mapped ONNX file; malformed input -> BundleError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise BundleError(f"{path}: cannot load this graph: empty file, not ONNX")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    return scan(view, size)
                finally:
                    view.release()
    except _Malformed as e:
        raise BundleError(f"{path}: cannot load this graph: not a valid ONNX protobuf ({e})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from None


def external_data_refs(path: str | Path) -> list[tuple[str, str]]:
    """(tensor name, location) for every tensor of the ONNX file that names an external file."""

    def scan(view, size: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        _walk(view, "model", 0, size, 0, out)
        return out

    return read_graph_file(path, scan)


# the wire-format readers, for other scanners of graph files (edge.runtime.shared_weights)
Malformed, fields, varint, text = _Malformed, _fields, _varint, _text

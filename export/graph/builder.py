"""A thin, readable layer over onnx.helper: named nodes, constants, shared external weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_ALIGN = 64  # byte alignment of each tensor inside the shared weights file

_ONNX_DTYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}
DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.FLOAT16: "float16",
               TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT32: "int32"}


class WeightStore:
    """One weights file per bundle: every graph references its tensors by offset, so a tensor
    used by several graphs (prefill, decode) is stored once."""

    def __init__(self, file_name: str = "weights.bin"):
        self.file_name = file_name
        self._arrays: dict[str, np.ndarray] = {}
        self._offsets: dict[str, int] = {}
        self._aliases: dict[str, str] = {}
        self._alias_shapes: dict[str, tuple[int, ...]] = {}
        self._alias_starts: dict[str, int] = {}  # byte offset of a row view inside its stored tensor
        self._size = 0

    def add(self, name: str, array: np.ndarray) -> str:
        if name in self._arrays:
            if self._arrays[name].shape != array.shape:
                raise ValueError(f"weight {name!r} added twice with different shapes")
            return name
        array = np.ascontiguousarray(array)
        self._size = -(-self._size // _ALIGN) * _ALIGN
        self._arrays[name] = array
        self._offsets[name] = self._size
        self._size += array.nbytes
        return name

    def alias(self, name: str, of: str, shape: tuple[int, ...] | None = None) -> str:
        """A second initializer name for the bytes of ``of`` (stored once), optionally viewed with
        another ``shape`` of the same size. onnxruntime fuses DQ -> MatMul into MatMulNBits only
        when no other node reads the int8 weight; a token lookup of the same table reads it under
        its own name (and the CPU plan's lookup needs the head's blocks as [vocab, hidden])."""
        if self._aliases.setdefault(name, of) != of or name in self._arrays:
            raise ValueError(f"weight alias {name!r} already names another tensor")
        if shape is not None:
            if int(np.prod(shape)) != self._arrays[of].size:
                raise ValueError(f"weight alias {name!r}: shape {shape} does not fit {of!r} {self._arrays[of].shape}")
            self._alias_shapes[name] = tuple(shape)
        return name

    def alias_rows(self, name: str, of: str, start: int, stop: int, total: int) -> str:
        """``name`` reads rows [start, stop) of stored weight ``of``, whose bytes are ``total`` equal
        rows (leading axis, or a flat array of ``total`` equal runs), in ``of``'s own layout: a
        weight split along its output rows (the CPU plan's head) while its whole stays readable."""
        a = self._arrays[of]
        if a.size % total or not 0 <= start < stop <= total:
            raise ValueError(f"weight view {name!r}: rows [{start}, {stop}) of {total} do not fit {of!r} {a.shape}")
        if self._aliases.setdefault(name, of) != of or name in self._arrays:
            raise ValueError(f"weight alias {name!r} already names another tensor")
        per_row = a.size // total
        self._alias_shapes[name] = ((stop - start, *a.shape[1:]) if a.ndim > 1 and a.shape[0] == total
                                    else ((stop - start) * per_row,))
        self._alias_starts[name] = start * per_row * a.itemsize
        return name

    def get(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)

    def tensor_proto(self, name: str) -> TensorProto:
        stored = self._aliases.get(name, name)
        a = self._arrays[stored]
        t = TensorProto()
        t.name = name
        t.data_type = _ONNX_DTYPE[a.dtype]
        shape = self._alias_shapes.get(name, a.shape)
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        offset, length = self._offsets[stored] + self._alias_starts.get(name, 0), int(np.prod(shape)) * a.itemsize
        for k, v in (("location", self.file_name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def write(self, folder: Path) -> Path:
        path = Path(folder) / self.file_name
        with open(path, "wb") as f:
            for name, a in self._arrays.items():
                f.seek(self._offsets[name])
                f.write(a.tobytes())
            f.truncate(self._size)
            f.flush()
            os.fsync(f.fileno())
        return path

    @property
    def nbytes(self) -> int:
        return self._size


class GraphBuilder:
    """Collects nodes for one graph. Weights go to the shared store; small constants stay inline."""

    def __init__(self, name: str, store: WeightStore):
        self.name = name
        self.store = store
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._weights: list[str] = []
        self._consts: dict[str, TensorProto] = {}
        self._counter = 0

    # -- declarations
    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, value: str, name: str, dtype: int, shape: list) -> str:
        """Declare a graph output; a value of another name is renamed through an Identity."""
        if value != name:
            self.op("Identity", [value], name=name, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        self.store.add(name, array)
        if name not in self._weights:
            self._weights.append(name)
        return name

    def weight_alias(self, name: str, of: str, shape: tuple[int, ...] | None = None) -> str:
        """``name`` reads the stored bytes of weight ``of`` (see WeightStore.alias)."""
        self.store.alias(name, of, shape)
        if name not in self._weights:
            self._weights.append(name)
        return name

    def weight_rows(self, name: str, of: str, start: int, stop: int, total: int) -> str:
        """``name`` reads rows [start, stop) of the stored weight ``of`` (see WeightStore.alias_rows)."""
        self.store.alias_rows(name, of, start, stop, total)
        if name not in self._weights:
            self._weights.append(name)
        return name

    def const(self, name: str, value) -> str:
        """A small inline constant (shapes, axes, scalars)."""
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if name not in self._consts:
            self._consts[name] = numpy_helper.from_array(arr, name)
        return name

    # -- nodes
    def op(self, op_type: str, inputs: list[str], name: str | None = None, out: str | None = None,
           n_out: int = 1, domain: str = "", outs: list[str] | None = None, **attrs) -> str:
        """``outs``: explicit output names (e.g. graph outputs written by the node itself)."""
        self._counter += 1
        name = name or f"{op_type}_{self._counter}"
        outs = outs or ([out or name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs  # type: ignore[return-value]

    def build(self) -> onnx.ModelProto:
        inits = [self.store.tensor_proto(n) for n in self._weights] + list(self._consts.values())
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edge")
        model.ir_version = 8  # readable by onnxruntime >= 1.14 on boards
        return model


def io_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Inputs/outputs of a graph as manifest records."""

    def spec(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": DTYPE_NAMES[v.type.tensor_type.elem_type], "shape": dims}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]

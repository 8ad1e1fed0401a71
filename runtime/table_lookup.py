"""The CPU plan's token-table lookup in numpy, straight from the bundle's weight file.

The embed graph (GatherBlockQuantized over the tied head's 8-bit blocks) reads the table through
onnxruntime's memory map of weights.bin, and every first touch of a row maps the whole
neighbourhood the kernel faults in around it (fault-around, 64 KB; MADV_RANDOM does not stop it):
a 512-token prompt made ~30 MB of the table resident for ~0.3 MB of rows (SmolLM2, 2026-12-02),
and a long chat would make all of it resident beside the head's packed copy. Here each row is read
with pread (the page cache holds the file, the process holds only the rows it asked for) and
dequantized exactly as the kernel does, (q - zero) * scale per block. The embed graph stays in the
bundle (other plans and runtimes use it); a graph that is not this form (a float table) keeps
running as a session.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.errors import BundleError

from edge.runtime.shared_weights import ExternalTensor, check_fits, external_initializers

_U8, _F32 = 2, 1  # TensorProto data types


class BlockTable:
    """Rows of a [vocab, hidden] uint8 table with one float scale and uint8 zero point per block,
    read from one file by offset."""

    def __init__(self, path: Path, data: ExternalTensor, scale: ExternalTensor, zero: ExternalTensor):
        self.path, self.hidden, self.blocks = path, data.dims[1], scale.dims[1]
        self.block = self.hidden // self.blocks
        # (offset, bytes per row, dtype) of each part
        self.data = (data.offset, self.hidden, np.uint8)
        self.scale = (scale.offset, 4 * self.blocks, np.float32)
        self.zero = (zero.offset, self.blocks, np.uint8)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    @classmethod
    def from_graph(cls, graph: Path, vocab: int, hidden: int) -> "BlockTable | None":
        """The table the embed graph ``graph`` gathers from, or None when the graph is not an 8-bit
        block table (data [vocab, hidden] uint8, scale [vocab, hidden / block] float32, zero the
        same shape in uint8, all in one weight file)."""
        if not hasattr(os, "pread"):  # Windows: the embed session reads the table
            return None
        tensors = external_initializers(graph)
        data = [t for t in tensors if t.dtype == _U8 and t.dims == (vocab, hidden)]
        if len(data) != 1 or len(tensors) != 3 or len({t.location for t in tensors}) != 1:
            return None
        rest = [t for t in tensors if t is not data[0]]
        scale = [t for t in rest if t.dtype == _F32]
        zero = [t for t in rest if t.dtype == _U8]
        if len(scale) != 1 or len(zero) != 1 or scale[0].dims != zero[0].dims or len(scale[0].dims) != 2 \
                or scale[0].dims[0] != vocab or scale[0].dims[1] == 0 or hidden % scale[0].dims[1]:
            return None
        path = graph.parent / data[0].location  # location checked against the manifest (bundle.py)
        size = path.stat().st_size
        for t in (data[0], scale[0], zero[0]):
            check_fits(graph, t, size)
        return cls(path, data[0], scale[0], zero[0])

    def _rows(self, ids: np.ndarray, part: tuple[int, int, type]) -> np.ndarray:
        offset, width, dtype = part
        out = bytearray(width * len(ids))
        for i, token in enumerate(ids.tolist()):
            row = os.pread(self.fd, width, offset + token * width)
            if len(row) != width:
                raise BundleError(f"{self.path}: short read of token {token}'s table row (file changed?)")
            out[i * width:(i + 1) * width] = row
        return np.frombuffer(out, dtype).reshape(len(ids), -1)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids [1, n] int64 (range-checked by the caller) -> embeddings [1, n, hidden] float32."""
        unique, where = np.unique(ids.reshape(-1), return_inverse=True)
        q = self._rows(unique, self.data).reshape(len(unique), self.blocks, self.block).astype(np.float32)
        scale, zero = self._rows(unique, self.scale), self._rows(unique, self.zero).astype(np.float32)
        rows = ((q - zero[:, :, None]) * scale[:, :, None]).reshape(len(unique), self.hidden)
        return rows[where.reshape(-1)].reshape(1, ids.size, self.hidden)

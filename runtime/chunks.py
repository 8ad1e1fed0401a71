"""Chunked prefill over a static-shape graph: the prompt cut into fixed-size chunks, the last one
zero-padded (padding sits after every real token, so the causal mask hides it from them), each
chunk run at its position and its real rows written to the KV cache. The runtime's fused plan,
the split plan, calibration and the export's accuracy check all cut prompts this way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edge.runtime.kv_cache import KVCache


@dataclass(frozen=True)
class Chunk:
    embeds: np.ndarray  # [1, C, H], zero-padded
    pos: int            # position of its first row
    count: int          # real rows
    last: bool


def cut(embeds: np.ndarray, chunk_length: int, start: int = 0) -> Iterator[Chunk]:
    """embeds [1, n, H] -> chunks of ``chunk_length`` rows from position ``start``."""
    n, hidden = embeds.shape[1], embeds.shape[2]
    for off in range(0, n, chunk_length):
        count = min(chunk_length, n - off)
        padded = np.zeros((1, chunk_length, hidden), np.float32)
        padded[0, :count] = embeds[0, off:off + count]
        yield Chunk(padded, start + off, count, off + count == n)


class ChunkRunner:
    """Runs a fused prefill graph (inputs_embeds, start, past_key_i/past_value_i [, logits_rows])
    chunk by chunk over a KVCache. ``prefix_rows``: the graph takes only the cache rows below
    ``start`` (else the whole static cache); ``logits_rows``: it computes logits only for the rows
    asked for (else for every row of the chunk)."""

    def __init__(self, session: ort.InferenceSession, chunk_length: int):
        self.session, self.C = session, chunk_length
        inputs = {i.name: i.shape for i in session.get_inputs()}
        self.prefix_rows = isinstance(inputs.get("past_key_0", (0,))[0], str)
        self.logits_rows = "logits_rows" in inputs
        self.names = [o.name for o in session.get_outputs()]

    def feeds(self, chunk: np.ndarray, pos: int, cache: KVCache, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The graph's inputs for one padded chunk [1, C, H] at ``pos``; ``rows``: its rows whose
        logits are needed (graphs without a logits_rows input compute them all)."""
        feeds = {"inputs_embeds": chunk, "start": np.array([pos], np.int64),
                 **cache.feeds(pos if self.prefix_rows else None)}
        if self.logits_rows:
            feeds["logits_rows"] = np.array(rows, np.int64)
        return feeds

    def run(self, embeds: np.ndarray, cache: KVCache, logits: str = "last") -> Iterator[tuple[Chunk, dict]]:
        """Prefill ``embeds`` from ``cache.length``; yields (chunk, outputs) per chunk, outputs'
        ``logits`` [r, V] holding the chunk's real rows (``logits="all"``), its last row on the
        last chunk only (``"last"``) or none (``"none"``)."""
        for c in cut(embeds, self.C, cache.length):
            rows = list(range(c.count)) if logits == "all" else [c.count - 1] if logits == "last" and c.last else []
            out = dict(zip(self.names, self.session.run(self.names, self.feeds(c.embeds, c.pos, cache, rows))))
            cache.write(c.pos, c.count, out)
            out["logits"] = out["logits"][0] if self.logits_rows else out["logits"][0, rows]
            yield c, out

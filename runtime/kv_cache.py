"""Static KV cache: one preallocated block, written by position (as in gpt-fast)."""

from __future__ import annotations

import numpy as np

from edge.config import DecoderConfig


class KVCache:
    """keys/values [layers, max_context, kv_heads, head_dim]; rows [0, length) are valid.

    Position-major rows make ``keys[i, :n]`` contiguous, so onnxruntime reads the cache in place.
    """

    def __init__(self, cfg: DecoderConfig, max_context: int):
        shape = (cfg.num_layers, max_context, cfg.num_kv_heads, cfg.head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def feeds(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """past_key_i / past_value_i: all rows (static prefill graphs) or the first ``rows``."""
        n = self.capacity if rows is None else rows
        out = {}
        for i in range(self.keys.shape[0]):
            out[f"past_key_{i}"] = self.keys[i, :n]
            out[f"past_value_{i}"] = self.values[i, :n]
        return out

    def write(self, start: int, count: int, outputs: dict[str, np.ndarray]) -> None:
        """Store the first ``count`` rows of present_key_i / present_value_i at ``start``."""
        for i in range(self.keys.shape[0]):
            self.keys[i, start:start + count] = outputs[f"present_key_{i}"][:count]
            self.values[i, start:start + count] = outputs[f"present_value_{i}"][:count]
        self.length = max(self.length, start + count)

    def reset(self) -> None:
        self.length = 0

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` positions' keys and values [layers, n, kv_heads, head_dim]."""
        return self.keys[:, :n], self.values[:, :n]

"""The CPU plan at run time: one session of the bundle's ``cpu`` graph for prompt chunks and
decode steps, its KV cache bound in place.

The cache is one [1, kv_heads, capacity, head_dim] buffer per layer and kind, allocated per
generation (``lazy_zeros``: pages become resident as rows are written) with a capacity that grows
with the context used (``CpuCache.grow``). Each buffer is wrapped as an OrtValue without a copy
and bound as BOTH the past_* input and the present_* output: GroupQueryAttention then appends the
new rows in place.
Per call only the small inputs are rebound (embeddings, logits rows, the two lengths).
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from edge.config import DecoderConfig
from edge.errors import PromptError


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros that become resident page by page as rows are written: an anonymous mapping without
    transparent huge pages. (np.zeros memory is backed in 2 MB huge pages where the kernel has THP
    on, and a layer's [max_context, head_dim] rows for one head are smaller than that, so the first
    rows written made the whole cache resident: SmolLM2 at context 2048, 94 MB for a 512-token
    prompt instead of ~26 MB.)"""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere plain anonymous pages, still lazy
        try:
            buf.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(buf, dtype, count=int(np.prod(shape))).reshape(shape)


CACHE_ROWS = 256  # a new cache's rows (capacity); it grows by doubling up to max_context


class CpuCache:
    """keys/values: one [1, kv_heads, capacity, head_dim] buffer per layer; rows [0, length) valid.
    Setting ``length`` lower rolls the cache back (rows beyond it are overwritten by the next call).

    The capacity follows the context used (CACHE_ROWS, doubled as needed up to ``max_context``):
    GroupQueryAttention's work and scratch follow the buffer's capacity, not only the rows used,
    where it converts an fp16 cache (docs/cpu_plan.md). Growing moves one layer at a time, so it
    holds at most one layer's rows twice."""

    def __init__(self, cfg: DecoderConfig, max_context: int, dtype=np.float32, rows: int = CACHE_ROWS):
        self.max_context, self.dtype = max_context, dtype
        self._shape = (1, cfg.num_kv_heads, min(rows, max_context), cfg.head_dim)
        self.keys = [lazy_zeros(self._shape, dtype) for _ in range(cfg.num_layers)]
        self.values = [lazy_zeros(self._shape, dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        self._bound: dict[str, ort.OrtValue] = {}  # key_i / value_i -> the OrtValue wrapping that buffer
        self._io: tuple[ort.InferenceSession, ort.IOBinding] | None = None
        self._step: DecodeStep | None = None  # the decode step's fixed inputs/output, while bound

    @property
    def capacity(self) -> int:
        return self._shape[2]

    def grow(self, total: int) -> None:
        """Make room for ``total`` rows: capacity doubled (at least ``total``, at most max_context),
        the valid rows copied layer by layer, the bindings made again on the next call."""
        rows = min(self.max_context, max(total, 2 * self.capacity))
        self._bound, self._io, self._step = {}, None, None  # drop the OrtValues of the old buffers
        self._shape = self._shape[:2] + (rows,) + self._shape[3:]
        n = self.length
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = lazy_zeros(self._shape, self.dtype)
                new[:, :, :n] = old[:, :, :n]
                buffers[i] = new  # the old mapping goes with its last reference

    def binding(self, session: ort.InferenceSession) -> ort.IOBinding:
        """This cache's IOBinding for ``session``, made once: every layer's buffer wrapped without a
        copy and bound as past_* input and present_* output alike."""
        if self._io is None or self._io[0] is not session:
            io = session.io_binding()
            io.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            for i in range(len(self.keys)):
                for kind, buf in (("key", self.keys[i]), ("value", self.values[i])):
                    v = ort.OrtValue.ortvalue_from_numpy(buf)
                    self._bound[f"{kind}_{i}"] = v
                    io.bind_ortvalue_input(f"past_{kind}_{i}", v)
                    io.bind_ortvalue_output(f"present_{kind}_{i}", v)
            self._io, self._step = (session, io), None
        return self._io[1]

    def decode_binding(self, session: ort.InferenceSession, hidden: int, vocab: int) -> "DecodeStep":
        """The binding with one decode step's inputs and logits bound to fixed buffers (a prompt
        call rebinds them: ``release_step``)."""
        if self._step is None:
            self._step = DecodeStep(self.binding(session), hidden, vocab)
        return self._step

    def room_for(self, n: int) -> int:
        """The token count after adding ``n`` tokens (the cache grown to hold them); PromptError
        when they do not fit in max_context."""
        total = self.length + n
        if total > self.max_context:
            raise PromptError(f"{total} tokens do not fit in the context of {self.max_context}")
        if total > self.capacity:
            self.grow(total)
        return total

    def release_step(self) -> None:
        self._step = None

    def reset(self) -> None:
        self.length = 0

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` positions' keys and values [layers, n, kv_heads, head_dim] (a copy)."""
        return tuple(np.stack([b[0, :, :n] for b in buffers]).transpose(0, 2, 1, 3).astype(np.float32)
                     for buffers in (self.keys, self.values))


class DecodeStep:
    """One token's call with nothing allocated or rebound per step: the embedding row, the lengths
    and the logits are numpy buffers wrapped as OrtValues and bound once; a step writes the inputs
    in place and reads the logits buffer (per-step binding and the output allocation cost ~0.6-1 ms
    of a 13-17 ms SmolLM2 step on an AVX2 machine, 2026-12-02)."""

    def __init__(self, io: ort.IOBinding, hidden: int, vocab: int):
        self.io = io
        self.embeds = np.zeros((1, 1, hidden), np.float32)
        self.seqlens = np.zeros(1, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((1, 1, vocab), np.float32)
        self._values = []  # the OrtValues must live as long as the binding uses them
        for name, buf in (("inputs_embeds", self.embeds), ("seqlens_k", self.seqlens),
                          ("total_sequence_length", self.total), ("logits_rows", np.zeros(1, np.int64))):
            v = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(name, v)
            self._values.append(v)
        out = ort.OrtValue.ortvalue_from_numpy(self.logits)
        io.bind_ortvalue_output("logits", out)
        self._values.append(out)


class CpuPlan:
    """Runs the ``cpu`` graph. ``chunk``: most tokens one call takes (bounds activation memory;
    a prompt longer than that runs in several calls)."""

    def __init__(self, session: ort.InferenceSession, cfg: DecoderConfig, max_context: int, chunk: int,
                 kv: str = "fp32"):
        self.session, self.cfg, self.max_context, self.chunk = session, cfg, max_context, chunk
        self.kv_dtype = {"fp32": np.float32, "fp16": np.float16}[kv]
        rows = {i.name: i.shape for i in session.get_inputs()}["past_key_0"][2]
        # a bundle exported before 2026-12-07 fixes the cache's rows at max_context in its graph
        self.cache_rows = rows if isinstance(rows, int) else CACHE_ROWS

    def new_cache(self) -> CpuCache:
        return CpuCache(self.cfg, self.max_context, self.kv_dtype, self.cache_rows)

    def run(self, embeds: np.ndarray, cache: CpuCache, rows: np.ndarray) -> np.ndarray:
        """embeds [1, S, H] at position cache.length -> logits [R, V] of ``rows`` (of the S)."""
        total = cache.room_for(embeds.shape[1])
        io = cache.binding(self.session)
        cache.release_step()  # the bindings below replace the decode step's buffers
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        io.bind_cpu_input("logits_rows", np.asarray(rows, np.int64))
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_output("logits")  # [1, R, V]: R changes, so onnxruntime allocates it per call
        self.session.run_with_iobinding(io)
        cache.length = total
        return io.get_outputs()[0].numpy()[0]

    def prefill(self, embeds: np.ndarray, cache: CpuCache, all_logits: bool = False) -> np.ndarray:
        """Logits [n, V] (all_logits) or [V] of the last token, in calls of at most ``chunk`` tokens."""
        n, out = embeds.shape[1], []
        for off in range(0, n, self.chunk):
            part = embeds[:, off:off + self.chunk]
            k = part.shape[1]
            last = off + k == n
            # no logits before the last call: the head would read the whole token table for nothing
            rows = np.arange(k) if all_logits else np.array([k - 1] if last else [], np.int64)
            logits = self.run(part, cache, rows)
            if all_logits or last:
                out.append(logits)
        return np.concatenate(out, 0) if all_logits else out[-1][-1]

    def decode_step(self, embeds: np.ndarray, cache: CpuCache) -> np.ndarray:
        """embeds [1, 1, H] at position cache.length -> logits [V] (a copy: the buffer is reused)."""
        total = cache.room_for(1)
        step = cache.decode_binding(self.session, self.cfg.hidden_size, self.cfg.vocab_size)
        step.embeds[...] = embeds.reshape(step.embeds.shape)
        step.seqlens[0], step.total[...] = total - 1, total
        self.session.run_with_iobinding(step.io)
        cache.length = total
        return step.logits[0, 0].copy()

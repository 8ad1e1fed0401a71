"""Resource bounds: context length, thread counts, and the memory a bundle needs.

The memory estimate is a lower bound of what running a bundle takes: its weights (read once), one
KV cache at the bundle's full context, and the largest activations of a prefill chunk (attention
scores over the whole context, the MLP, the logits). When it exceeds the memory available here
(``MemAvailable`` of /proc/meminfo), loading is refused with the numbers; the exporter warns (the
bundle may be meant for another machine). Where /proc/meminfo is absent the check is skipped, and
the message says so. ``EDGE_MEMORY_CHECK=off`` skips it on purpose (e.g. with swap to spare).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edge.errors import EdgeError

MAX_CONTEXT = 131_072  # positions; the largest context any supported model family was trained on
FLOAT_BYTES = 4
MEMINFO = "/proc/meminfo"


class ResourceError(EdgeError):
    """A request is beyond what the machine (or a sane bound) allows."""


def max_threads() -> int:
    """The most onnxruntime threads a session may ask for: 4 per CPU core (more only contend)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(value: object, what: str = "threads", minimum: int = 0) -> int:
    """An integer in [minimum, max_threads()] (0 = onnxruntime's default, where allowed)."""
    top = max_threads()
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= top:
        raise ResourceError(f"{what}: expected an integer from {minimum} to {top} (4 x {os.cpu_count() or 1} CPU "
                            f"cores){' (0 = default)' if minimum == 0 else ''}, got {value!r}")
    return value


def check_context(value: int, what: str = "context", model_max: int | None = None) -> int:
    """A context length within the hard cap and, when known, the model's trained positions."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ResourceError(f"{what}: expected an integer >= 1, got {value!r}")
    if value > MAX_CONTEXT:
        raise ResourceError(f"{what}: expected at most {MAX_CONTEXT} positions (edge's limit), got {value}")
    if model_max is not None and value > model_max:
        raise ResourceError(f"{what}: expected at most {model_max} positions (the model's max_position_embeddings: "
                            f"it was not trained on longer ones), got {value}")
    return value


def mem_available(meminfo: str = MEMINFO) -> int | None:
    """Bytes the kernel says can be allocated without swapping (None where unknown)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (f"about {_mib(self.total)} (weights {_mib(self.weights)} + KV cache {_mib(self.kv_cache)} at context "
                f"{self.context} + activations {_mib(self.activations)})")


def estimate(num_layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
             vocab: int, context: int, chunk: int, weights_bytes: int, kv_bytes: int = FLOAT_BYTES) -> MemoryEstimate:
    kv = 2 * num_layers * context * kv_heads * head_dim * kv_bytes
    # one chunk in flight: scores + probabilities over the whole context, q/k/v, the MLP, logits
    act = FLOAT_BYTES * (2 * heads * chunk * context + chunk * (3 * hidden + 3 * intermediate + vocab)
                         + 2 * kv_heads * head_dim * context)
    return MemoryEstimate(int(weights_bytes), int(kv), int(act), int(context))


def estimate_for(cfg, context: int, chunk: int, weights_bytes: int, kv_bytes: int = FLOAT_BYTES) -> MemoryEstimate:
    """From a DecoderConfig (edge.config). ``kv_bytes``: edge.plans.Plans.cache_element_bytes."""
    return estimate(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                    cfg.head_dim, cfg.vocab_size, context, chunk, weights_bytes, kv_bytes)


def memory_check_enabled() -> bool:
    return os.environ.get("EDGE_MEMORY_CHECK", "on").lower() not in ("off", "0", "no")


def check_memory(need: MemoryEstimate, where: str, refuse: bool = True, available: int | None = None) -> str | None:
    """Refuse (``refuse``) or return a warning when ``need`` exceeds the available memory; returns a
    note when the check cannot be made here, else None (also when EDGE_MEMORY_CHECK=off)."""
    if not memory_check_enabled():
        return None  # skipped on purpose, silently
    available = mem_available() if available is None else available
    if available is None:
        return f"{where}: memory check skipped ({MEMINFO} has no MemAvailable here); needs {need.describe()}"
    if need.total <= available:
        return None
    msg = (f"{where}: needs {need.describe()}, but only {_mib(available)} is available "
           f"({MEMINFO} MemAvailable); export with a smaller --context, or free memory")
    if refuse:
        raise ResourceError(msg + " (EDGE_MEMORY_CHECK=off skips this check)")
    return "warning: " + msg

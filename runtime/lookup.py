"""Prompt lookup decoding: generation on the CPU plan that guesses the next tokens from the text
so far and checks the guesses in one call.

A decode step reads every weight once for one token; on a memory-bound CPU a call with a few more
tokens costs little more (SmolLM2-135M int8dyn, 2 threads, 512 tokens cached, 2026-12-07: 1 token
9.7 ms, 5 tokens 13.6 ms). When the last n tokens (n = MAX_NGRAM down to MIN_NGRAM) occurred
before, the tokens that followed them there are the draft; one call of [token] + draft gives the
model's logits after each, and ``Sampler.verify`` keeps the draft up to its first miss, plus the
model's own token there. Greedy: every token is the argmax of the model's logits at its position,
so the output is the model's greedy output (with a dynamically quantized bundle the draft rows
share one activation scale per call, as a prompt chunk's rows do). Sampled: speculative sampling
with the draft as a point proposal, the distribution of sampling one token at a time. It pays
where the output repeats its context (code, quoting, summaries, lists) and costs one slightly
longer call per miss elsewhere. The method of transformers' ``prompt_lookup_num_tokens`` and
llama.cpp's lookup example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Iterator, Sequence

import numpy as np

from edge.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from edge.runtime.cpu_plan import CpuCache
    from edge.runtime.model import Model

LOOKUP_TOKENS = 4   # draft tokens per call (the runtime's default; 0 = off)
LOOKUP_MAX = 64     # most draft tokens per call a caller may ask for
MIN_NGRAM, MAX_NGRAM = 2, 4  # single-token matches guessed wrong too often to pay (docs/cpu_plan.md)


def default_lookup(linears: str) -> int:
    """Draft tokens per call for a CPU plan with these linears (edge.plans.CPU_LINEARS): float
    MatMul is compute-bound at 5 rows (SmolLM2 fp32: 0.8x with lookup), the quantized kernels
    are memory-bound (int8dyn 1.0-1.8x, int4 1.0-1.35x over five prompts, 2026-12-07)."""
    return 0 if linears == "fp32" else LOOKUP_TOKENS


def add_lookup_flag(parser) -> None:
    """``--lookup N`` of edge-run and edge-serve."""
    from edge.cli_errors import bounded_int

    parser.add_argument("--lookup", type=bounded_int(0, LOOKUP_MAX), default=None, metavar="N",
                        help="decoding on the CPU plan: draft up to N tokens per call from the text so far and keep "
                             "those the model agrees with (prompt lookup; 0 = one token per call; default: "
                             f"{LOOKUP_TOKENS} for greedy decoding with quantized linears, else 0; given, it applies to "
                             "sampling too)")


@dataclass
class LookupStats:
    """What lookup did in one generation: calls that checked a draft, tokens drafted, tokens kept."""

    calls: int = 0
    drafted: int = 0
    kept: int = 0

    def summary(self) -> str:
        return f"lookup: {self.calls} draft calls, {self.kept} of {self.drafted} drafted tokens kept"


class NgramIndex:
    """The tokens so far, and for each n-gram (MIN_NGRAM <= n <= MAX_NGRAM) the position of the
    token after its latest occurrence: a draft lookup is a dict access, not a scan."""

    def __init__(self, tokens: Sequence[int] = ()):
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            p = len(self.tokens)
            for n in range(MIN_NGRAM, min(MAX_NGRAM, p) + 1):
                self._after[tuple(self.tokens[p - n:p])] = p
            self.tokens.append(int(t))

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier occurrence of the last n tokens."""
        if k <= 0:
            return []
        toks = self.tokens
        for n in range(min(MAX_NGRAM, len(toks)), MIN_NGRAM - 1, -1):
            at = self._after.get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []


def lookup_decode(model: "Model", logits: np.ndarray, cache: "CpuCache", context: Sequence[int],
                  max_new_tokens: int, stop: Collection[int], draft_tokens: int = LOOKUP_TOKENS,
                  stats: LookupStats | None = None, sampler: Sampler | None = None) -> Iterator[int]:
    """The tokens after the prompt's last ``logits``, as ``Model.generate_ids`` yields them:
    ``sampler`` picks them (None: greedy) and checks the drafts (``Sampler.verify``). The same
    ``cache.length`` at every yield as one token per call (the tokens before the one yielded) and
    at the end, so a chat turn that stops early keeps a consistent cache. ``context``: the token ids
    the cache holds (the prompt), where drafts are looked up."""
    if max_new_tokens <= 0:
        return
    sampler = sampler if sampler is not None else Sampler(SamplingParams())
    index = NgramIndex(context)
    stats = stats if stats is not None else LookupStats()
    produced, token = 0, sampler(logits)
    while True:
        if token in stop:
            return
        yield token
        produced += 1
        index.extend([token])
        if produced == max_new_tokens or cache.length >= model.max_context:
            return
        # the draft's tokens and the model's token after them must fit the budget and the context
        room = min(draft_tokens, max_new_tokens - produced - 1, model.max_context - cache.length - 1)
        draft = index.draft(room)
        if not draft:
            token = sampler(model.decode_step(token, cache))
            continue
        base = cache.length
        rows = model.cpu.run(model.embed([token, *draft]), cache, np.arange(len(draft) + 1))
        kept, after = sampler.verify(rows, draft)
        stats.calls, stats.drafted, stats.kept = stats.calls + 1, stats.drafted + len(draft), stats.kept + kept
        for j in range(kept):
            cache.length = base + 1 + j  # the rows of the tokens before draft[j], as one step at a time
            if draft[j] in stop:
                return
            yield draft[j]
            produced += 1
            index.extend([draft[j]])
        cache.length = base + 1 + kept  # the rows after the first miss are overwritten by the next call
        token = after


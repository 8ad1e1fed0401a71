"""Next-token selection: greedy, or temperature + top-k + top-p with a seeded generator."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
        if not real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise PromptError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not real(self.top_p) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)
                                      or self.seed < 0):
            raise PromptError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


TOP_P_CANDIDATES = 256  # tokens sorted first for top-p (more only when they hold less than top_p)


class Sampler:
    """Picks tokens. Sampled: the support after temperature, top-k and top-p is found without
    sorting the whole vocabulary (a full argsort of 49,152 logits cost 7 ms a token), and a token is
    drawn by inverting the support's cumulative distribution in token-id order with one uniform
    draw, which is what ``Generator.choice(p=...)`` over the whole vocabulary does: the same tokens
    for a seed as that, at a fraction of the cost."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        return self._draw(*self.support(logits))

    def support(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids in ascending order, their probabilities, float64, summing to 1): temperature,
        then top-k, then top-p (the smallest set of most likely tokens reaching top_p). Sampled only."""
        p = self.params
        z = logits.astype(np.float64) / p.temperature
        ids = np.arange(z.size)
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            ids = np.flatnonzero(z >= kth)  # ties at the k-th value stay in, as a mask keeps them
            z = z[ids]
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            m = min(TOP_P_CANDIDATES, probs.size)
            while True:
                # the m most likely (all of them once m passes an eighth), in token-id order, then a
                # stable sort by probability: ties keep token-id order, as a full stable argsort does
                top = np.sort(np.argpartition(-probs, m - 1)[:m]) if 8 * m < probs.size else np.arange(probs.size)
                order = top[np.argsort(-probs[top], kind="stable")]
                cum = np.cumsum(probs[order])
                if cum[-1] >= p.top_p or top.size == probs.size:
                    break
                m *= 8
            keep = np.sort(order[: int(np.searchsorted(cum, p.top_p)) + 1])
            ids, probs = ids[keep], probs[keep] / probs[keep].sum()
        return ids, probs

    def _draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        return int(ids[min(int(np.searchsorted(cdf, self.rng.random(), side="right")), ids.size - 1)])

    def verify(self, rows: np.ndarray, draft: Sequence[int]) -> tuple[int, int]:
        """Speculative decoding's check of ``draft`` against the model's logits ``rows`` (row j:
        the logits the token after draft[:j] is drawn from; len(draft) + 1 rows). Returns (drafts
        kept, the next token). Greedy: kept while each is the argmax, then the argmax. Sampled: the
        draft is a point proposal, so draft[j] is kept with probability p_j(draft[j]) and at the
        first rejection the token is drawn from p_j without it (renormalized): the tokens come out
        with the distribution of sampling one at a time (Leviathan et al. 2023), not the same draws."""
        if self.params.greedy:
            best = np.argmax(rows, axis=-1)
            kept = 0
            while kept < len(draft) and best[kept] == draft[kept]:
                kept += 1
            return kept, int(best[kept])
        for j, d in enumerate(draft):
            ids, probs = self.support(rows[j])
            at = int(np.searchsorted(ids, d))
            here = at < ids.size and ids[at] == d
            if here and self.rng.random() < probs[at]:
                continue
            if here:  # the rest of the support; probs[at] < 1 here, else the draw above keeps it
                ids, probs = np.delete(ids, at), np.delete(probs, at)
            return j, self._draw(ids, probs)
        return len(draft), self(rows[len(draft)])

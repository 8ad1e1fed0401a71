"""Prompt lookup decoding (runtime/lookup.py): the n-gram drafts, the control flow against the
one-token-per-call loop on a scripted model (budgets, stop ids, a full context, a consumer that
stops early: same tokens and the same cache length at every yield), sampling through it (the
distribution of one token per call), and on real sessions of a tiny random float CPU bundle: the
same tokens and KV rows as without lookup, in generate and in chat.
Tiny random models: structure and parity only; speed figures are edge-bench's (docs/cpu_plan.md)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_module
from edge.config import ExportOptions
from edge.export.pipeline import export_model
from edge.export.quant.plan import QuantOptions
from edge.export.quant.recipe import AccuracySpec
from edge.progress import Progress
from edge.runtime import Model
from edge.runtime.lookup import LOOKUP_TOKENS, LookupStats, NgramIndex, lookup_decode
from edge.runtime.sampling import SamplingParams


def test_drafts_follow_the_longest_earlier_match():
    # (7, 1, 2) occurred before, followed by 3; the later (1, 2) was followed by 4: longest wins
    idx = NgramIndex([7, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2])
    assert idx.draft(3) == [3, 9, 1]
    idx.extend([5])  # (1, 2, 5) and (2, 5) never occurred
    assert idx.draft(3) == []
    assert NgramIndex([1, 5, 1]).draft(4) == []  # single-token matches are not drafted
    later = NgramIndex([1, 2, 8, 1, 2, 9, 1, 2])  # the latest occurrence of (1, 2) wins
    assert later.draft(1) == [9] and later.draft(0) == []
    assert NgramIndex([4, 6, 4, 6]).draft(5) == [4, 6]  # a draft may be shorter than asked


# ---------------------------------------------------------------- control flow on a scripted model


class ScriptedModel:
    """A model whose greedy next token is a fixed function of (token, position): repetitive, so
    drafts are often right, with a change of rule every 11 positions, so some are wrong. The
    cache records the token fed at each row."""

    vocab = 40

    def __init__(self, max_context: int):
        self.max_context = max_context
        self.cpu = self

    def next_token(self, token: int, pos: int) -> int:
        return (3 * token + pos // 11) % 7 + 20 * ((pos // 11) % 2)

    def logits(self, token: int, pos: int) -> np.ndarray:
        out = np.zeros(self.vocab, np.float32)
        out[self.next_token(token, pos)] = 1.0
        return out

    def new_cache(self):
        return ScriptedCache(self.max_context)

    def embed(self, ids):
        return list(ids)

    def prefill(self, ids, cache):
        return self.run(ids, cache, [len(ids) - 1])[0]

    def run(self, ids, cache, rows):
        assert cache.length + len(ids) <= self.max_context
        out = []
        for t in ids:
            cache.rows[cache.length] = t
            out.append(self.logits(t, cache.length))
            cache.length += 1
        return np.stack(out)[np.asarray(rows)]

    def decode_step(self, token, cache):
        return self.run([token], cache, [0])[0]


class ScriptedCache:
    def __init__(self, capacity: int):
        self.rows = [None] * capacity
        self.length = 0

    def held(self) -> list:
        return self.rows[:self.length]


def one_per_call(model, prompt, max_new, stop):
    """Model.generate_ids' loop without lookup: (token, cache rows held at its yield) pairs."""
    cache = model.new_cache()
    logits = model.prefill(prompt, cache)
    out = []
    for i in range(max_new):
        token = int(np.argmax(logits))
        if token in stop:
            break
        out.append((token, cache.held()))
        if i + 1 == max_new or cache.length >= model.max_context:
            break
        logits = model.decode_step(token, cache)
    return out, cache.held()


def with_lookup(model, prompt, max_new, stop, draft, stats):
    cache = model.new_cache()
    logits = model.prefill(prompt, cache)
    out = [(t, cache.held()) for t in lookup_decode(model, logits, cache, prompt, max_new, stop, draft, stats)]
    return out, cache.held()


@pytest.mark.parametrize("draft", [1, 2, LOOKUP_TOKENS, 9])
def test_lookup_matches_one_token_per_call(draft):
    """Every budget up to past the context, every stop id the output reaches, several draft
    lengths: the same tokens, the same cache rows at each yield and at the end."""
    model = ScriptedModel(max_context=64)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    stats = LookupStats()
    full, _ = one_per_call(model, prompt, 80, ())
    assert len(full) == 64 - len(prompt) + 1  # the context ends it: the last token is never fed
    for max_new in list(range(0, 12)) + [30, 54, 55, 80]:
        assert with_lookup(model, prompt, max_new, (), draft, stats) == one_per_call(model, prompt, max_new, ())
    for stop in sorted({t for t, _ in full}):
        assert with_lookup(model, prompt, 80, {stop}, draft, stats) == one_per_call(model, prompt, 80, {stop})
    assert stats.kept > 0 and stats.drafted > stats.kept  # drafts were kept and drafts missed


def test_a_consumer_that_stops_early_leaves_the_rows_it_saw():
    """Closing the generator at any token leaves the cache holding the tokens before it (what a
    chat turn cut by a stop string keeps), as without lookup."""
    model = ScriptedModel(max_context=64)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    plain, _ = one_per_call(model, prompt, 40, ())
    for n in range(1, 30):
        cache = model.new_cache()
        gen = lookup_decode(model, model.prefill(prompt, cache), cache, prompt, 40, (), LOOKUP_TOKENS)
        got = [next(gen) for _ in range(n)]
        gen.close()
        assert got == [t for t, _ in plain[:n]]
        assert cache.held() == plain[n - 1][1]


class SoftScriptedModel(ScriptedModel):
    """Three tokens whose logits are a fixed random function of (token, position mod 4): sampled
    continuations, with every token pair in the prompt so drafts come at each step."""

    vocab = 3
    table = np.random.default_rng(7).normal(size=(3, 4, 3)) * 1.5

    def logits(self, token: int, pos: int) -> np.ndarray:
        return self.table[token, pos % 4].astype(np.float32)


def exact_joint(model, prompt, params, n):
    """P(t1..tn) of sampling one token at a time: the product of the sampler's distributions."""
    from edge.runtime.sampling import Sampler

    sampler, out = Sampler(params), {}
    for seq in np.ndindex(*(model.vocab,) * n):
        p, last = 1.0, prompt[-1]
        for i, t in enumerate(seq):
            ids, probs = sampler.support(model.logits(last, len(prompt) - 1 + i))
            p *= float(probs[ids == t].sum())  # 0 off the support
            last = t
        out[seq] = p
    return out


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 2)])
def test_sampled_lookup_has_the_distribution_of_one_token_per_call(temperature, top_k):
    """Speculative sampling with the draft as a point proposal (Sampler.verify): over 20,000 seeds
    the first 3 tokens' joint frequencies (27 outcomes) are within 0.04 in total variation of the
    exact distribution of sampling one at a time, as one token per call's are (expected noise
    ~0.015; keeping a rejected draft's probability in the resample biases it by more)."""
    from edge.runtime.sampling import Sampler, SamplingParams

    model = SoftScriptedModel(max_context=64)
    prompt = [0, 1, 2, 0, 2, 1, 1, 0, 0, 2, 2, 1, 0]
    exact = exact_joint(model, prompt, SamplingParams(temperature, top_k), 3)
    stats = LookupStats()
    counts = {"lookup": {}, "one per call": {}}
    for seed in range(20_000):
        params = SamplingParams(temperature, top_k, seed=seed)
        cache = model.new_cache()
        seq = tuple(lookup_decode(model, model.prefill(prompt, cache), cache, prompt, 3, (), LOOKUP_TOKENS, stats,
                                  Sampler(params)))
        counts["lookup"][seq] = counts["lookup"].get(seq, 0) + 1
        sample, cache = Sampler(params), model.new_cache()
        seq, logits = [], model.prefill(prompt, cache)
        for _ in range(3):
            seq.append(sample(logits))
            logits = model.decode_step(seq[-1], cache)
        counts["one per call"][tuple(seq)] = counts["one per call"].get(tuple(seq), 0) + 1
    for name, got in counts.items():
        tv = 0.5 * sum(abs(got.get(k, 0) / 20_000 - p) for k, p in exact.items())
        assert tv < 0.04, (name, tv)
    assert stats.kept > 0 and stats.drafted > stats.kept


# ---------------------------------------------------------------- real sessions (tiny float CPU bundle)


def cpu_only(zoo, out, linears):
    export_model(zoo.folder("llama"), out, ExportOptions(chunk_length=16, max_context=128, plans=("cpu",)),
                 Progress(enabled=False), quant=QuantOptions(cpu=linears), accuracy=AccuracySpec(enabled=False))
    return out


@pytest.fixture(scope="module")
def float_cpu(zoo, tmp_path_factory):
    return cpu_only(zoo, tmp_path_factory.mktemp("lookup") / "fp32", "fp32")


def prompts(n: int):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 300, 12).tolist() * 3 for _ in range(n)]


def test_float_bundle_same_tokens_and_rows(float_cpu):
    """The model's verify calls (a token and its draft in one call) give the tokens and the KV
    rows of one token per call (float bundle: 1e-4), over prompts where drafts are kept and missed."""
    on, off = Model.load(float_cpu, lookup=LOOKUP_TOKENS), Model.load(float_cpu, lookup=0)
    stats = LookupStats()
    for ids in prompts(8):
        caches = on.new_cache(), off.new_cache()
        a = list(on.generate_ids(ids, 60, stop_ids=[], cache=caches[0], lookup_stats=stats))
        b = list(off.generate_ids(ids, 60, stop_ids=[], cache=caches[1]))
        assert a == b
        assert caches[0].length == caches[1].length == len(ids) + 59
        for x, y in zip(caches[0].rows(caches[0].length), caches[1].rows(caches[1].length)):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
    assert stats.calls > 0 and stats.kept > 0 and stats.drafted > stats.kept


def test_sampled_generation_with_lookup(float_cpu):
    """Sampling through lookup on real sessions: drafts checked, the same seed the same text."""
    on = Model.load(float_cpu, lookup=LOOKUP_TOKENS)
    stats = LookupStats()
    params = SamplingParams(temperature=0.2, top_p=0.9, seed=3)  # near greedy: the tiny model repeats
    for ids in prompts(8):
        first = list(on.generate_ids(ids, 60, params, stop_ids=[], lookup_stats=stats))
        assert list(on.generate_ids(ids, 60, params, stop_ids=[])) == first and len(first) == 60
    assert stats.calls > 0


def test_chat_turns_with_lookup(float_cpu):
    """Two chat turns (the second reuses the first's cache rows): the same answers and reuse."""
    answers = []
    for lookup in (LOOKUP_TOKENS, 0):
        chat = Model.load(float_cpu, lookup=lookup).chat_session()
        texts = [chat.send(q, max_new_tokens=24) for q in ("one two three one two three", "one two three again")]
        answers.append((texts, chat.last.cached_tokens))
    assert answers[0] == answers[1]
    assert answers[0][1] > 0


def test_which_bundles_decode_by_lookup(zoo, float_cpu, tmp_path):
    quantized = Model.load(cpu_only(zoo, tmp_path / "int8dyn", "int8dyn"))
    assert quantized.lookup == LOOKUP_TOKENS
    stats = LookupStats()
    for ids in prompts(8):
        assert len(list(quantized.generate_ids(ids, 40, stop_ids=[], lookup_stats=stats))) == 40
    assert stats.calls > 0
    sampled = LookupStats()  # by default not for sampled text (fewer drafts kept), unless asked for
    for ids in prompts(8):
        list(quantized.generate_ids(ids, 40, SamplingParams(temperature=0.2, seed=1), stop_ids=[], lookup_stats=sampled))
    assert sampled.calls == 0 and not quantized.lookup_sampled
    assert Model.load(float_cpu).lookup == 0  # float MatMul is compute-bound at 5 rows
    assert Model.load(zoo.bundle("llama", 16), plan="fused", lookup=4).lookup == 0  # one-token decode graph
    with pytest.raises(ValueError, match=r"lookup must be an integer in \[0, 64\]"):
        Model.load(float_cpu, lookup=-1)


def test_run_lookup_flag_and_stats(zoo):
    bundle = zoo.bundle("llama", 16)  # a float CPU plan: lookup off unless asked for
    r = run_module("edge.runtime.cli", bundle, "--prompt", "hi hi hi hi", "--raw", "--max-new-tokens", "12",
                   "--stats", "--lookup", "4")
    assert r.returncode == 0, r.stderr
    assert "draft calls" in r.stderr
    off = run_module("edge.runtime.cli", bundle, "--prompt", "hi hi hi hi", "--raw", "--max-new-tokens", "12",
                     "--stats")
    assert off.returncode == 0 and "draft calls" not in off.stderr
    bad = run_module("edge.runtime.cli", bundle, "--prompt", "hi", "--lookup", "65")
    assert bad.returncode == 2 and "--lookup" in bad.stderr

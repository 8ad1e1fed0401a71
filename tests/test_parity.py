"""Exported bundles against transformers (the numerical oracle), float32, on the cpu and fused plans.

Tiny random LLaMA, Qwen2 (q/k/v biases) and a LLaMA with tied embeddings, each exported from its
HF folder: full-prompt logits, chunked vs unchunked prefill, prefill + decode steps, continuation
prefill into a filled cache, and greedy generations token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VARIANTS

ATOL = 1e-4
VOCAB = 300
LENGTHS = (1, 7, 16, 33, 100)
NAMES = tuple(VARIANTS)


@pytest.fixture(params=("cpu", "fused"))
def plan(request) -> str:
    """Every parity test runs on both text plans: the CPU plan's one fused-kernel graph and the
    accelerator method's static chunk graphs (the split plan: tests/test_lanes.py)."""
    return request.param


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(1000 + n + seed).integers(0, VOCAB, n).tolist()


def hf_logits(zoo, name: str, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return zoo.hf_model(name)(torch.tensor([ids])).logits[0].numpy()


def edge_logits(model, ids: list[int]) -> np.ndarray:
    return model.prefill(model.embed(ids), model.new_cache(), all_logits=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", (16, 64))
@pytest.mark.parametrize("n", LENGTHS)
def test_prefill_logits_match_transformers(plan, zoo, name, chunk, n):
    ids = prompt(n)
    got = edge_logits(zoo.model(name, chunk, plan=plan), ids)
    ref = hf_logits(zoo, name, ids)
    assert got.shape == ref.shape == (n, VOCAB)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.5  # the tiny model's logits are not all alike: the comparison means something


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", (16, 64))
def test_chunked_prefill_matches_one_pass(plan, zoo, name, chunk):
    """C in {16, 64} against a bundle whose chunk (128) holds the whole 100-token prompt."""
    ids = prompt(100, seed=7)
    whole, chunked = zoo.model(name, 128, plan=plan), zoo.model(name, chunk, plan=plan)
    c_whole, c_chunked = whole.new_cache(), chunked.new_cache()
    ref = whole.prefill(whole.embed(ids), c_whole, all_logits=True)
    got = chunked.prefill(chunked.embed(ids), c_chunked, all_logits=True)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # same KV cache, and nothing written past the prompt (padding rows never reach the cache)
    assert c_whole.length == c_chunked.length == 100
    (kc, vc), (kw, vw) = c_chunked.rows(c_chunked.capacity), c_whole.rows(c_whole.capacity)
    np.testing.assert_allclose(kc[:, :100], kw[:, :100], atol=ATOL, rtol=0)
    np.testing.assert_allclose(vc[:, :100], vw[:, :100], atol=ATOL, rtol=0)
    assert not kc[:, 100:].any() and not vc[:, 100:].any()


@pytest.mark.parametrize("n", (7, 16, 33))
def test_last_row_prefill_equals_all_rows(plan, zoo, n):
    """The prefill graph reads only the cache rows below ``start`` (dynamic past) and computes logits
    only for the rows asked for (``logits_rows``): generation's last-row prefill, whose earlier
    chunks ask for no rows at all, equals the all-rows prefill's last row (to rounding: a one-row
    output projection may sum in another order than an n-row one) and writes the same cache."""
    model = zoo.model("llama", 16, plan=plan)
    inputs = {t.name: t.shape for t in model.bundle.manifest.graphs["prefill" if plan == "fused" else "cpu"].inputs}
    assert "logits_rows" in inputs
    if plan == "fused":  # a dynamic past; the CPU plan's cache is one static buffer bound in place
        assert isinstance(inputs["past_key_0"][0], str)
    ids = prompt(n, seed=3)
    c_all, c_last = model.new_cache(), model.new_cache()
    full = model.prefill(model.embed(ids), c_all, all_logits=True)
    last = model.prefill(model.embed(ids), c_last)
    assert full.shape == (n, VOCAB) and last.shape == (VOCAB,)
    np.testing.assert_allclose(last, full[-1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(c_last.keys, c_all.keys)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", (1, 7, 33))
def test_decode_steps_match_full_forward(plan, zoo, name, n):
    model = zoo.model(name, 16, plan=plan)
    ids = prompt(n, seed=3)
    cache = model.new_cache()
    logits = model.prefill(model.embed(ids), cache)
    np.testing.assert_allclose(logits, hf_logits(zoo, name, ids)[-1], atol=ATOL, rtol=0)
    for step in range(8):
        token = int(np.argmax(logits)) if step % 2 else (17 * step + 5) % VOCAB  # greedy and forced tokens
        ids.append(token)
        logits = model.decode_step(token, cache)
        assert cache.length == len(ids)
        np.testing.assert_allclose(logits, hf_logits(zoo, name, ids)[-1], atol=ATOL, rtol=0,
                                   err_msg=f"decode step {step} (position {len(ids) - 1})")


@pytest.mark.parametrize("name", NAMES)
def test_continuation_prefill_into_filled_cache(plan, zoo, name):
    """A second prefill starting at a position that is not a chunk boundary (multi-turn)."""
    model = zoo.model(name, 16, plan=plan)
    first, second = prompt(21, seed=4), prompt(30, seed=5)
    cache = model.new_cache()
    model.prefill(model.embed(first), cache)
    got = model.prefill(model.embed(second), cache, all_logits=True)
    ref = hf_logits(zoo, name, first + second)[21:]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_prefill_up_to_context_not_multiple_of_chunk(plan, zoo):
    """Context 40 with chunk 16: the last padded chunk covers positions 32..47, past the context."""
    model = zoo.model("llama", 16, 40, plan=plan)
    ids = prompt(39, seed=6)
    np.testing.assert_allclose(edge_logits(model, ids), hf_logits(zoo, "llama", ids), atol=ATOL, rtol=0)
    cache = model.new_cache()
    logits = model.prefill(model.embed(ids), cache)
    ids.append(int(np.argmax(logits)))
    np.testing.assert_allclose(model.decode_step(ids[-1], cache), hf_logits(zoo, "llama", ids)[-1], atol=ATOL, rtol=0)


def hf_greedy(zoo, name: str, ids: list[int], new: int, eos: int | None) -> list[int]:
    hf = zoo.hf_model(name)
    cfg = hf.generation_config
    saved = cfg.eos_token_id
    cfg.eos_token_id = eos
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
    finally:
        cfg.eos_token_id = saved
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", (16, 64))
@pytest.mark.parametrize("n", (7, 33))
def test_greedy_generation_token_identical(plan, zoo, name, chunk, n):
    ids = prompt(n, seed=8)
    ref = hf_greedy(zoo, name, ids, 20, eos=None)
    assert len(ref) == 20  # eos disabled on the transformers side too
    got = list(zoo.model(name, chunk, plan=plan).generate_ids(ids, 20, stop_ids=[]))
    assert got == ref
    assert len(set(ref)) > 3  # a varied continuation, not one token repeated


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_stops_at_eos_like_transformers(plan, zoo, name):
    """Make the 6th greedy token the eos: transformers emits it and stops; edge stops before it."""
    ids = prompt(7, seed=9)
    free = hf_greedy(zoo, name, ids, 20, eos=None)
    eos = free[5]
    first = free.index(eos)  # the token may already occur earlier
    ref = hf_greedy(zoo, name, ids, 20, eos=eos)
    assert ref == free[:first + 1] and ref[-1] == eos
    model = zoo.model(name, 16, plan=plan)
    assert list(model.generate_ids(ids, 20, stop_ids=[eos])) == ref[:-1]


def test_default_stop_is_the_models_eos(plan, zoo):
    model = zoo.model("llama", 16, plan=plan)
    assert 2 in model.config.eos_token_ids  # config eos_token_id and tokenizer eos <|im_end|>
    assert model.config.bos_token_id == 0

"""The Python API: sampling, streaming, chat template, context limits, parameter checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge.config import ExportOptions
from edge.errors import PromptError
from edge.progress import Progress
from edge.runtime import Model, SamplingParams
from edge.runtime.sampling import Sampler

PROMPT = "hello world"  # the tiny llama continues it for 20+ tokens, raw and templated


@pytest.fixture(scope="module")
def model(zoo):
    return zoo.model("llama", 16)


def sample_ids(model, temperature=1.0, top_k=0, top_p=1.0, seed=None, n=20):
    ids = model.encode_prompt(PROMPT, raw=True)
    return list(model.generate_ids(ids, n, SamplingParams(temperature, top_k, top_p, seed), stop_ids=[]))


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    a, b = sample_ids(model, seed=1), sample_ids(model, seed=1)
    assert a == b and len(a) == 20
    assert sample_ids(model, seed=2) != a
    text = model.generate(PROMPT, max_new_tokens=12, temperature=0.9, seed=5, raw=True)
    assert model.generate(PROMPT, max_new_tokens=12, temperature=0.9, seed=5, raw=True) == text


def test_sampling_differs_from_greedy(model):
    greedy = sample_ids(model, temperature=0.0)
    assert any(sample_ids(model, temperature=1.5, seed=s) != greedy for s in range(3))


@pytest.mark.parametrize("temperature", (0.5, 1.0, 3.0))
def test_top_k_1_and_tiny_top_p_equal_greedy(model, temperature):
    greedy = sample_ids(model, temperature=0.0)
    assert sample_ids(model, temperature, top_k=1, seed=3) == greedy
    assert sample_ids(model, temperature, top_p=1e-9, seed=4) == greedy


def test_sampler_distribution_top_k_top_p():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))

    def draws(params, n=4000):
        sampler = Sampler(params)
        return np.bincount([sampler(logits) for _ in range(n)], minlength=5) / n

    full = draws(SamplingParams(temperature=1.0, seed=0))
    np.testing.assert_allclose(full, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.03)
    top2 = draws(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert top2[2:].sum() == 0
    np.testing.assert_allclose(top2[:2], [2 / 3, 1 / 3], atol=0.03)
    nucleus = draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0))  # 0.5 + 0.25 + 0.15 >= 0.8
    assert nucleus[3:].sum() == 0
    np.testing.assert_allclose(nucleus[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)
    hot = draws(SamplingParams(temperature=0.25, seed=0))  # sharper than T=1
    assert hot[0] > 0.85


def reference_draw(rng, logits, p):
    """Sampling as written plainly: the whole vocabulary masked by top-k and a full stable sort for
    top-p, then Generator.choice over all of it."""
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < z.size:
        z = np.where(z < np.partition(z, -p.top_k)[-p.top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), p.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))


@pytest.mark.parametrize("params", [SamplingParams(0.7, 0, 0.95, 0), SamplingParams(1.0, 0, 1.0, 1),
                                    SamplingParams(0.7, 40, 1.0, 2), SamplingParams(0.5, 50, 0.9, 3),
                                    SamplingParams(3.0, 0, 0.99, 4)])
def test_sampler_draws_the_plain_implementations_tokens(params):
    """The sampler finds the support without sorting the vocabulary, and draws the tokens the plain
    implementation draws for the same seed: peaked logits (a small nucleus), flat ones (the full
    sort), integer ones (ties at the top-k and top-p boundaries)."""
    rng = np.random.default_rng(9)
    sampler, reference = Sampler(params), np.random.default_rng(params.seed)
    for scale in (8.0, 0.5, None):
        for _ in range(60):
            logits = (rng.integers(-3, 4, 5000) if scale is None else rng.normal(size=5000) * scale).astype(np.float32)
            assert sampler(logits) == reference_draw(reference, logits, params)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("raw", (True, False))
def test_stream_pieces_join_to_generate(model, raw):
    pieces = list(model.stream(PROMPT, max_new_tokens=24, raw=raw))
    assert len(pieces) > 1  # text arrives piece by piece
    text = model.generate(PROMPT, max_new_tokens=24, raw=raw)
    assert "".join(pieces) == text
    ids = list(model.generate_ids(model.encode_prompt(PROMPT, raw=raw), 24))
    full = model.tokenizer.decode(ids)
    # the stream holds back an unfinished UTF-8 sequence at the very end, nothing else
    assert full == text or (full.startswith(text) and set(full[len(text):]) == {"\ufffd"})


def test_sampled_stream_matches_sampled_generate(model):
    kw = dict(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, seed=11, raw=True)
    assert "".join(model.stream(PROMPT, **kw)) == model.generate(PROMPT, **kw)


def test_zero_new_tokens(model):
    assert model.generate(PROMPT, max_new_tokens=0) == ""


# ---------------------------------------------------------------- chat template


def test_chat_template_matches_transformers(zoo, model):
    hf_tok = zoo.hf_tokenizer("llama")
    messages = [{"role": "user", "content": PROMPT}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert model.encode_prompt(PROMPT) == list(expected)
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert model.tokenizer.apply_chat_template(messages) == rendered
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    assert model.encode_prompt(PROMPT, raw=True) == hf_tok.encode(PROMPT, add_special_tokens=False)


@pytest.mark.parametrize("raw", (True, False))
def test_generate_uses_template_unless_raw(model, raw):
    ids = model.encode_prompt(PROMPT, raw=raw)
    expected = model.tokenizer.decode(model.generate_ids(ids, 16))
    got = model.generate(PROMPT, max_new_tokens=16, raw=raw)
    assert expected.startswith(got) and len(got) >= len(expected.rstrip("\ufffd"))


def test_bundle_without_chat_template_needs_raw(zoo, tmp_path):
    from edge.export.pipeline import export_model

    folder = zoo.copy_folder(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    export_model(folder, tmp_path / "b", ExportOptions(16, 64), Progress(enabled=False))
    m = Model.load(tmp_path / "b")
    with pytest.raises(PromptError, match="no chat template.*raw=True"):
        m.generate(PROMPT, max_new_tokens=2)
    assert isinstance(m.generate(PROMPT, max_new_tokens=2, raw=True), str)


# ---------------------------------------------------------------- limits and bad parameters


def test_prompt_longer_than_context(model):
    assert model.max_context == 256
    with pytest.raises(PromptError) as e:
        model.generate("x" * 300, raw=True)
    assert "300" in str(e.value) and "256" in str(e.value)
    with pytest.raises(PromptError) as e:
        model.generate("x" * 300)  # template adds tokens
    assert "256" in str(e.value) and "tokens" in str(e.value)
    with pytest.raises(PromptError, match="256"):
        model.generate("x" * 256, raw=True)  # no room for a single new token


def test_prompt_ids_longer_than_context(model):
    with pytest.raises(PromptError, match=r"257.*256"):
        list(model.generate_ids([5] * 257, 4))


def test_generation_stops_when_context_is_full(model):
    ids = model.encode_prompt("x" * 255, raw=True)
    assert len(ids) == 255
    out = list(model.generate_ids(ids, 10, stop_ids=[]))
    assert len(out) == 2  # one from the prompt's logits, one from the decode step at position 255


@pytest.mark.parametrize("kw, word", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=math.nan), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_generation_parameters(model, kw, word):
    with pytest.raises(PromptError, match=word):
        model.generate(PROMPT, **kw)


def test_bad_prompts(model):
    with pytest.raises(PromptError, match="str"):
        model.generate(123)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="empty"):
        model.generate("", raw=True)
    with pytest.raises(PromptError, match=r"\[0, 300\)"):
        list(model.generate_ids([1, 300], 2))

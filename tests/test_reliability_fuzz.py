"""Property-based tests (hypothesis): the manifest parser, the ONNX external-data scanner and the
tokenizer + chat template, fed random and mutated input.

Parsers: any input gives a result or a BundleError, never another exception.
Tokenizer: user text round-trips exactly and never yields a control token; the template's own
control tokens are always exactly where the template puts them.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.errors import BundleError, PromptError
from edge.manifest import Manifest, parse_manifest, read_manifest
from edge.runtime.onnx_refs import external_data_refs
from edge.runtime.tokenizer import Tokenizer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL_TEXT = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>system\n", "<|im_end|>\n",
                "<|", "|>", "im_end", "\n", " ", "\ue000", "\ue001", "\ue0000\ue001"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["..", "/etc/passwd", "weights.bin", "../x",
                                                                "edge-bundle", "C:\\x", "a\x00b", ""]))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=20)


@pytest.fixture(scope="module")
def valid_manifest(zoo) -> dict:
    return json.loads((zoo.bundle("llama", chunk=16, context=64) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def graph_bytes(zoo) -> bytes:
    return (zoo.bundle("llama", chunk=16, context=64) / "decode.onnx").read_bytes()


@pytest.fixture(scope="module")
def tok(zoo) -> Tokenizer:
    from tiny_models import CHAT_TEMPLATE

    return Tokenizer(zoo.bundle("llama") / "tokenizer.json", CHAT_TEMPLATE)


def parse_or_refuse(data) -> Manifest | None:
    try:
        return parse_manifest(data, "manifest.json")
    except BundleError:
        return None


# ---------------------------------------------------------------- manifest


@FAST
@given(json_values)
def test_random_json_is_refused_cleanly(data):
    parse_or_refuse(data)


def _paths(node, prefix=()):
    """Every (path) in a JSON tree, containers included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


MUTATIONS = ["delete", "replace", "wrap", "empty", "add_key", "negate", "nan", "dotdot"]


@FAST
@given(st.data())
def test_mutated_manifest_is_parsed_or_refused_cleanly(valid_manifest, data):
    m = copy.deepcopy(valid_manifest)
    paths = list(_paths(m))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        how = data.draw(st.sampled_from(MUTATIONS))
        if not path:
            m = data.draw(json_values)
            break
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            old = parent[key] if isinstance(parent, (dict, list)) else None
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
        if not isinstance(parent, (dict, list)):
            continue
        if how == "delete":
            del parent[key]
        elif how == "replace":
            parent[key] = data.draw(json_values)
        elif how == "wrap":
            parent[key] = [old]
        elif how == "empty":
            parent[key] = type(old)() if isinstance(old, (dict, list, str)) else None
        elif how == "add_key" and isinstance(old, dict):
            old[data.draw(st.text(max_size=10))] = data.draw(json_values)
        elif how == "negate" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = -old - 1
        elif how == "nan":
            parent[key] = math.nan
        elif how == "dotdot":
            parent[key] = "../" + str(old)
    result = parse_or_refuse(m)
    if result is not None:  # accepted: then it is self-consistent
        for g in result.graphs.values():
            assert g.file in result.files
        assert result.tokenizer["file"] in result.files
        assert 1 <= result.chunk_length <= result.max_context


@FAST
@given(st.data())
def test_manifest_file_bytes_are_read_or_refused_cleanly(valid_manifest, data):
    text = json.dumps(valid_manifest).encode()
    kind = data.draw(st.sampled_from(["random", "truncate", "flip", "splice"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=300))
    elif kind == "truncate":
        blob = text[: data.draw(st.integers(0, len(text)))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(text) - 1))
        blob = text[:i] + bytes([text[i] ^ (1 << data.draw(st.integers(0, 7)))]) + text[i + 1:]
    else:
        i = data.draw(st.integers(0, len(text)))
        blob = text[:i] + data.draw(st.binary(max_size=20)) + text[i:]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "manifest.json").write_bytes(blob)
        try:
            read_manifest(Path(d))
        except BundleError:
            pass


# ---------------------------------------------------------------- ONNX external-data scanner


@FAST
@given(st.data())
def test_graph_scanner_on_damaged_files(graph_bytes, data):
    blob = bytearray(graph_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del blob[i:]
        elif kind == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del blob[i:i + data.draw(st.integers(1, 16))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.onnx"
        path.write_bytes(bytes(blob))
        try:
            refs = external_data_refs(path)
        except BundleError as e:
            assert "g.onnx" in str(e)
        else:
            assert all(isinstance(n, str) and isinstance(loc, str) for n, loc in refs)


# ---------------------------------------------------------------- tokenizer + chat template

# text that mixes arbitrary unicode with pieces of control tokens and of the template
user_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT)), max_size=8).map("".join)


@FAST
@given(st.text(max_size=200))
def test_plain_encoding_round_trips(tok, text):
    ids = tok.encode(text, special=False)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids, skip_special=False) == text


@FAST
@given(user_text)
def test_user_text_round_trips_and_never_makes_control_tokens(tok, text):
    ids = tok.encode(text, special=False)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids, skip_special=False) == text


ROLES = st.sampled_from(["system", "user", "assistant", "tool"])


@FAST
@given(st.lists(st.tuples(ROLES, user_text), min_size=1, max_size=4), st.booleans())
def test_chat_template_control_tokens_come_only_from_the_template(tok, turns, gen_prompt):
    messages = [{"role": r, "content": c} for r, c in turns]
    ids = tok.encode_chat(messages, add_generation_prompt=gen_prompt)
    # the control tokens are exactly those of the same conversation with harmless content
    harmless = tok.encode_chat([{"role": r, "content": "x"} for r, _ in turns], add_generation_prompt=gen_prompt)
    assert [i for i in ids if i in tok.special_ids] == [i for i in harmless if i in tok.special_ids]
    # and the text is exactly the rendered template (user text kept verbatim)
    assert tok.decode(ids, skip_special=False) == tok.apply_chat_template(messages, gen_prompt)
    # without any special-token text the ids are the plain encoding of the rendering
    if not any(s in c for _, c in turns for s in ("<|", "|>")):
        assert ids == tok.encode(tok.apply_chat_template(messages, gen_prompt))


@FAST
@given(st.text(max_size=50).filter(lambda s: any(0xD800 <= ord(c) <= 0xDFFF for c in s)) |
       st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), st.sampled_from(["\ud800", "\udcff", "\udfff"]),
                 st.text(max_size=5)))
def test_invalid_unicode_is_a_prompt_error(tok, text):
    assume(any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    with pytest.raises(PromptError, match="not valid Unicode"):
        tok.encode_chat([{"role": "user", "content": text}])
    with pytest.raises(PromptError, match="not valid Unicode"):
        tok.encode(text)

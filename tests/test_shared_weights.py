"""One memory map of weights.bin shared by the embed/prefill/decode sessions (tiny random models:
structure only; the memory figures are in edge-bench)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge.errors import BundleError
from edge.runtime import Model
from edge.runtime.shared_weights import ExternalTensor, SharedWeights, external_initializers

IDS = [5, 17, 3, 99, 42, 7, 250, 1, 64, 33, 12, 18, 200, 150, 2, 9, 77, 31, 45]


def test_records_match_onnx(zoo):
    """The protobuf scan finds exactly onnx's external initializers, with their dtype, dims and place."""
    bundle = zoo.bundle("llama")
    for graph in ("embed.onnx", "prefill.onnx", "decode.onnx"):
        model = onnx.load(str(bundle / graph), load_external_data=False)
        want = {}
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if "location" in ext:
                want[t.name] = ExternalTensor(t.name, t.data_type, tuple(t.dims), ext["location"],
                                              int(ext.get("offset", 0)), int(ext["length"]))
        got = {t.name: t for t in external_initializers(bundle / graph)}
        assert got == want and want


def test_shared_and_private_weights_agree(zoo):
    bundle = zoo.bundle("llama")
    shared = Model.load(bundle, threads=1, verify_hashes=False)
    private = Model.load(bundle, threads=1, verify_hashes=False, share_weights=False)
    assert shared.shared_weights is not None and shared.shared_weights._values  # float weights: shared
    a = shared.prefill(shared.embed(IDS), shared.new_cache(), all_logits=True)
    b = private.prefill(private.embed(IDS), private.new_cache(), all_logits=True)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert list(shared.generate_ids(IDS, 12)) == list(private.generate_ids(IDS, 12))


def test_a_record_that_leaves_the_file_is_refused(zoo):
    bundle = zoo.bundle("llama")
    size = (bundle / "weights.bin").stat().st_size
    weights = SharedWeights(bundle)
    for offset, length, dims in ((size - 256, 512, (128,)), (0, 512, (64,)), (-4, 512, (128,))):
        with pytest.raises(BundleError, match="does not fit weights.bin"):
            weights.value(bundle / "prefill.onnx", ExternalTensor("w", 1, dims, "weights.bin", offset, length))

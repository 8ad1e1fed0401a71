"""One memory map of weights.bin shared by the embed/prefill/decode sessions (tiny random models:
structure only; the memory figures are in edge-bench)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import resident_kib
from edge.errors import BundleError
from edge.runtime import Model
from edge.runtime.shared_weights import ExternalTensor, SharedWeights, drop_mapped_pages, external_initializers

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


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_drop_mapped_pages_unmaps_clean_pages_and_keeps_copies(tmp_path):
    """Clean pages of a file mapping leave the process and read back the same; a private mapping
    with a page of its own (copy-on-write) is left alone, so its change survives."""
    import mmap

    path = tmp_path / "w.bin"
    data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    data.tofile(path)
    with open(path, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cow_path = tmp_path / "c.bin"
    data.tofile(cow_path)
    with open(cow_path, "r+b") as f:
        cow = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view, cview = np.frombuffer(ro, np.float32), np.frombuffer(cow, np.float32)
    assert view.sum() == data.sum() and cview.sum() == data.sum()
    cview[5] = -1.0  # one private page
    cow_resident = resident_kib(cow_path)
    assert resident_kib(path) >= 4000 and cow_resident > 0
    advised = drop_mapped_pages([path, cow_path])
    assert advised == 4 << 20  # the read-only mapping only
    assert resident_kib(path) == 0 and resident_kib(cow_path) == cow_resident
    np.testing.assert_array_equal(view, data)  # faulted back in from the file
    assert cview[5] == -1.0 and cview[6] == 6.0
    del view, cview
    ro.close()
    cow.close()


"""Open a bundle: manifest validated, files present with the recorded size and sha256, graph
inputs/outputs checked against the manifest, all before anything runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnxruntime as ort

from edge.budget import check_memory, estimate_for
from edge.errors import BundleError
from edge.manifest import MANIFEST_NAME, GraphSpec, Manifest, read_manifest, safe_relative, verify_files
from edge.manifest_checks import check_graphs_match

from edge.runtime.onnx_refs import external_data_refs



@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name


def open_bundle(path: str | Path, verify_hashes: bool = True, memory_check: bool = True) -> Bundle:
    """``memory_check``: refuse a bundle whose estimated memory need (weights + KV cache at its
    max_context + activations, edge/budget.py) exceeds the memory available here."""
    path = Path(path)
    manifest = read_manifest(path)
    # every plan's graphs are checked present when the manifest is read (edge.plans)
    check_graphs_match(manifest, str(path / MANIFEST_NAME))  # chunk length, heads, cache shapes vs the graphs
    verify_files(path, manifest, check_hashes=verify_hashes)
    for key, spec in manifest.graphs.items():
        check_external_data(path, key, spec, manifest)
    if memory_check:
        need = estimate_for(manifest.model, manifest.max_context, manifest.chunk_length,
                            sum(r["size"] for r in manifest.files.values()), manifest.plans.cache_element_bytes)
        note = check_memory(need, f"{path} (max_context {manifest.max_context})", refuse=True)
        if note:
            logging.getLogger("edge").warning(note)  # no handler configured: one plain line on stderr
    return Bundle(path.resolve(), manifest)


def check_external_data(bundle: Path, key: str, spec: GraphSpec, manifest: Manifest) -> None:
    """Every external-data file the ONNX graph names must be a listed (hence size/hash-checked) bundle
    file, and one the manifest records for this graph. onnxruntime >= 1.2x refuses paths that leave
    the model folder too; this check does not depend on its version and names the field at fault."""
    graph = bundle / spec.file
    recorded = None if spec.external_data is None else set(spec.external_data)
    for tensor, location in external_data_refs(graph):
        where = f"{graph}: tensor {tensor!r} external_data location"
        name = PurePosixPath(safe_relative(location, where)).as_posix()
        if name not in manifest.files:
            raise BundleError(f"{where} {location!r} is not a file listed in the manifest (files)")
        if recorded is not None and name not in recorded:
            raise BundleError(f"{where} {location!r} is not in manifest graphs.{key}.external_data {sorted(recorded)}")


def check_session_io(session: ort.InferenceSession, spec: GraphSpec, where: str) -> None:
    """The ONNX file must have exactly the inputs/outputs (names, shapes) the manifest promises."""
    got_in = {i.name: tuple(i.shape) for i in session.get_inputs()}
    got_out = {o.name: tuple(o.shape) for o in session.get_outputs()}
    for kind, expected, got in (("input", spec.inputs, got_in), ("output", spec.outputs, got_out)):
        if set(got) != {t.name for t in expected}:
            raise BundleError(f"{where}: {kind}s {sorted(got)[:4]}... differ from the manifest's")
        for t in expected:
            if tuple(t.shape) != got[t.name]:
                raise BundleError(f"{where}: {kind} {t.name} has shape {list(got[t.name])}, manifest says {list(t.shape)}")

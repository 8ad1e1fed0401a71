"""Open a bundle: manifest validated, files present with the recorded size and sha256, graph
inputs/outputs checked against the manifest, all before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edge.errors import BundleError
from edge.manifest import GraphSpec, Manifest, read_manifest, verify_files

REQUIRED_GRAPHS = ("embed", "prefill", "decode")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name


def open_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    path = Path(path)
    manifest = read_manifest(path)
    for role in REQUIRED_GRAPHS:
        if role not in manifest.graphs:
            raise BundleError(f"{path}/manifest.json: graphs.{role} missing (has {sorted(manifest.graphs)})")
    verify_files(path, manifest, check_hashes=verify_hashes)
    return Bundle(path.resolve(), manifest)


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

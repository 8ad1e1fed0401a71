"""edge-export's pipeline: source -> family config -> graphs -> bundle (atomic)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import onnx

import edge
from edge.config import ExportOptions
from edge.manifest import FORMAT_VERSION, MANIFEST_NAME, GraphSpec, Manifest, TensorSpec, file_record

from edge.progress import Progress

from .bundle_writer import write_atomically
from .families import family_for
from .graph.builder import WeightStore, io_specs
from .graph.decoder import DecoderGraph, build_embed_graph
from .sources import load_source

TOKENIZER_FILE = "tokenizer.json"


def _graph_spec(model: onnx.ModelProto, file: str, role: str) -> GraphSpec:
    ins, outs = io_specs(model)
    spec = lambda d: TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))  # noqa: E731
    return GraphSpec(file=file, role=role, dtype="float32", inputs=tuple(map(spec, ins)), outputs=tuple(map(spec, outs)))


def export_model(model: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None) -> Manifest:
    progress = progress or Progress(total_steps=4)
    with progress.stage(f"loading {model}"):
        source = load_source(model)
        family = family_for(source.architecture)
        cfg = family.config(source.hf_config, source.special_tokens)
        weights = family.sanitize(source.weights, cfg)
    progress.note(f"{family.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                  f"{sum(w.size for w in weights.values()) / 1e6:.1f}M parameters")
    if options.max_context > source.hf_config.get("max_position_embeddings", options.max_context):
        progress.note(f"warning: context {options.max_context} exceeds the model's trained "
                      f"{source.hf_config['max_position_embeddings']} positions")

    with progress.stage(f"building graphs (chunk {options.chunk_length}, context {options.max_context})"):
        store = WeightStore()
        dec = DecoderGraph(cfg, weights, store, options.max_context)
        graphs = {
            "embed": (build_embed_graph(cfg, weights, store), "embed.onnx", "embed"),
            "prefill": (dec.build("prefill", options.chunk_length, options.max_context), "prefill.onnx", "prefill"),
            "decode": (dec.build("decode", 1, "past_len"), "decode.onnx", "decode"),
        }

    def fill(tmp: Path) -> None:
        store.write(tmp)
        for proto, file, _ in graphs.values():
            onnx.save_model(proto, str(tmp / file))
        (tmp / TOKENIZER_FILE).write_text(source.tokenizer_json, encoding="utf-8")
        files = {p.name: file_record(p) for p in sorted(tmp.iterdir())}
        manifest = Manifest(
            model=cfg,
            chunk_length=options.chunk_length,
            max_context=options.max_context,
            graphs={k: _graph_spec(proto, file, role) for k, (proto, file, role) in graphs.items()},
            tokenizer={"file": TOKENIZER_FILE, "chat_template": source.chat_template},
            files=files,
            exporter={"name": "edge", "version": edge.__version__, "onnx": onnx.__version__,
                      "python": platform.python_version()},
            source=source.identity,
            quantization={"prefill": "fp32", "decode": "fp32"},
            format_version=FORMAT_VERSION,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
        fill.manifest = manifest  # type: ignore[attr-defined]

    with progress.stage(f"writing bundle {out} ({store.nbytes / 1e6:.0f} MB of weights)"):
        write_atomically(Path(out), fill)
    return fill.manifest  # type: ignore[attr-defined]

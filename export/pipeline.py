"""edge-export's pipeline: source -> family config -> graphs -> bundle (atomic)."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

import edge
from edge.config import ExportOptions
from edge.plans import Plans
from edge.manifest import FORMAT_VERSION, MANIFEST_NAME, GraphSpec, Manifest, TensorSpec, file_record

from edge.budget import check_context, check_memory, estimate_for
from edge.errors import ModelSourceError
from edge.progress import Progress

from edge.export.bundle_writer import write_atomically
from edge.export.checks import check_tokenizer
from edge.export.target import check_target, check_writable_parent
from edge.export.families import family_for
from edge.export.graph.builder import WeightStore, io_specs
from edge.export.graph.split import build_split
from edge.export.graph.vision import build_vision_graph
from edge.export.quant.recipe import FLOAT, AccuracySpec, CalibrationSpec, decoders, measure, plan_for_export
from edge.export.sources import load_source
from edge.export.quant.vision import vision_linear

if TYPE_CHECKING:
    from edge.export.quant.calibrate import Calibration
    from edge.export.quant.plan import QuantOptions

TOKENIZER_FILE = "tokenizer.json"


def _external_files(model: onnx.ModelProto) -> tuple[str, ...]:
    """Files the graph's tensors live in (recorded so the runtime can check them before loading)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return tuple(sorted({e.value for t in _get_all_tensors(model) if uses_external_data(t)
                         for e in t.external_data if e.key == "location"}))


def _graph_spec(model: onnx.ModelProto, file: str, role: str) -> GraphSpec:
    ins, outs = io_specs(model)
    spec = lambda d: TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))  # noqa: E731
    return GraphSpec(file=file, role=role, dtype="float32", inputs=tuple(map(spec, ins)), outputs=tuple(map(spec, outs)),
                     external_data=_external_files(model))


def export_model(model: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None, quant: "QuantOptions | None" = None,
                 calibration: CalibrationSpec = CalibrationSpec(), accuracy: AccuracySpec = AccuracySpec(),
                 calibrated: "Calibration | None" = None) -> Manifest:
    """``quant`` None = float bundle. A quantized export calibrates (unless ``calibrated`` is given),
    plans, and (``accuracy.enabled``) records held-out perplexities in the manifest."""
    quant = quant or FLOAT
    progress = progress or Progress(total_steps=4 + 2 * quant.quantized)
    out = Path(out)
    # the target first (before minutes of work): edge's to replace, not holding the model, writable
    check_target(out, [model] if Path(model).exists() else [])
    check_writable_parent(out)
    with progress.stage(f"loading {model}"):
        source = load_source(model)
        check_target(out, source_paths(model, source))  # an alias's file too
        family = family_for(source.architecture)
        cfg = _decoder_config(family, source)
        check_context(options.max_context, "--context", _trained_positions(source))
        check_tokenizer(source.tokenizer_json, source.chat_template, cfg, _origin(source, "tokenizer.json"))
        weights = _sanitize(family, source, cfg)
        vision = family.vision(source, cfg) if family.vision else None  # multimodal: image side
    progress.note(f"{family.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                  f"{sum(w.size for w in weights.values()) / 1e6:.1f}M parameters")

    plan, calib_record = None, None
    if quant.quantized:
        plan, cal = plan_for_export(cfg, weights, source.tokenizer_json, source.chat_template, options, quant,
                                    calibration, progress, calibrated)
        calib_record = {"text": calibration.label, "tokens": cal.tokens, "window": calibration.window}

    with progress.stage(f"building graphs (chunk {options.chunk_length}, context {options.max_context})"):
        store = WeightStore()
        parts = decoders(cfg, weights, store, options.max_context, quant, plan)
        dec = parts.prefill
        graphs = {
            "embed": (parts.embed(), "embed.onnx", "embed"),
            "prefill": (dec.build("prefill", options.chunk_length, "past_len", logits_rows=True), "prefill.onnx",
                        "prefill"),
            "decode": (parts.decode.build("decode", 1, "past_len"), "decode.onnx", "decode"),
        }
        split_plan = None
        if "split" in options.plans:  # per-layer subgraphs for a CPU + accelerator prefill (same weights)
            split_graphs, split_plan = build_split(dec, options.chunk_length)
            graphs.update({k: (proto, f"{k}.onnx", "split") for k, proto in split_graphs.items()})
        if vision is not None:  # image tiles -> image-token embeddings, merged into the prompt by the runtime
            vision = dataclasses.replace(vision, linear_weights=options.vision_weights)
            graphs["vision"] = (build_vision_graph(vision, weights, store, vision_linear(options.vision_weights)),
                                "vision.onnx", "vision")

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
            quantization={**parts.record, **({"calibration": calib_record} if calib_record else {})},
            format_version=FORMAT_VERSION,
            plans=Plans(default="fused", split=split_plan),
            vision=vision,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
        if accuracy.enabled and (quant.quantized or quant.decode != "fp32"):
            # measured on the bundle as written, before it replaces the target
            from edge.runtime.model import Model

            progress.note("measuring held-out perplexity (quantized bundle vs float)")
            rec = measure(cfg, weights, Model.load(tmp, verify_hashes=False), quant, plan, options.chunk_length,
                          accuracy, progress)
            manifest = dataclasses.replace(manifest, quantization={**manifest.quantization, "accuracy": rec})
            (tmp / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
        fill.manifest = manifest  # type: ignore[attr-defined]

    need = estimate_for(cfg, options.max_context, options.chunk_length, store.nbytes)
    progress.note(f"running the bundle needs {need.describe()}")
    warning = check_memory(need, f"bundle {out.name}", refuse=False)
    if warning:
        progress.note(warning)  # the bundle may be meant for a larger machine: the runtime refuses then
    with progress.stage(f"writing bundle {out} ({store.nbytes / 1e6:.0f} MB of weights)"):
        write_atomically(out, fill, source_paths(model, source))
    return fill.manifest  # type: ignore[attr-defined]


def source_paths(model: str | Path, source) -> list[Path]:
    """The files/folders an export reads (a target must not contain them)."""
    paths = [Path(model)] if Path(model).exists() else []
    if isinstance(source.identity.get("path"), str):
        paths.append(Path(source.identity["path"]))
    return paths


def _origin(source, name: str) -> str:
    path = source.identity.get("path", "")
    if source.identity.get("kind") == "gguf":
        return f"{path}: GGUF metadata ({name} rebuilt from it)" if name != "config" else f"{path}: GGUF metadata"
    return f"{Path(path) / name}" if path else name


def _decoder_config(family, source):
    """The family's config; a value the config record refuses names the file it came from."""
    try:
        return family.config(source.hf_config, source.special_tokens)
    except ModelSourceError as e:  # families name "config.json": say which one
        msg, path = str(e), source.identity.get("path")
        if source.identity.get("kind") == "hf-folder" and path and msg.startswith("config.json"):
            raise type(e)(f"{Path(path) / 'config.json'}{msg[len('config.json'):]}") from None
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ModelSourceError(f"{_origin(source, 'config.json' if source.identity.get('kind') != 'gguf' else 'config')}: "
                               f"{e}") from None


def _sanitize(family, source, cfg):
    """The family's weights; a refusal names the source (and, for a GGUF, the metadata key it read)."""
    try:
        return family.sanitize(source.weights, cfg)
    except ModelSourceError as e:
        msg, path = str(e), source.identity.get("path", "")
        if source.identity.get("kind") == "gguf":
            arch = source.hf_config.get("model_type", "llama")
            msg = msg.replace("config.json num_hidden_layers", f"the GGUF metadata's {arch}.block_count")
        raise type(e)(f"{path}: {msg}" if path else msg) from None


def _trained_positions(source) -> int | None:
    cfg = source.hf_config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    value = cfg.get("max_position_embeddings", text.get("max_position_embeddings"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

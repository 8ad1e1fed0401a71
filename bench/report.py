"""edge-bench results: the JSON report (medians with min/max, ratios edge/peer), the terminal
table, and the PNG plots (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

METRICS = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mib")


def _stat(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _result(n: int, children: list[dict], reference: list[int] | None) -> dict[str, Any]:
    ok = [c for c in children if c["status"] == "ok"]
    if not ok:
        c = children[0] if children else {"status": "skipped", "reason": "not run"}
        return {"prompt_tokens": n, "status": c["status"], "reason": c.get("reason"),
                **({"stderr_tail": c["stderr_tail"]} if "stderr_tail" in c else {})}
    out: dict[str, Any] = {"prompt_tokens": n, "status": "ok"}
    if len(ok) < len(children):
        out["failed_children"] = [c.get("reason") for c in children if c["status"] != "ok"]
    out["ttft_ms"] = _stat([t * 1e3 for c in ok for t in c["ttft_s"]])
    out["prefill_tok_s"] = _stat([v for c in ok for v in c["prefill_tok_s"]])
    out["decode_tok_s"] = _stat([v for c in ok for v in c["decode_tok_s"]])
    out["peak_rss_mib"] = _stat([c["peak_rss_mib"] for c in ok])
    out["rss_after_load_mib"] = _stat([c.get("rss_after_load_mib") for c in ok])
    out["load_s"] = _stat([c.get("load_s") for c in ok])
    tokens = ok[0].get("tokens") or []
    out["tokens"] = tokens
    if reference is not None and tokens:
        same = 0
        for a, b in zip(tokens, reference):
            if a != b:
                break
            same += 1
        out["greedy_prefix_match"] = same  # leading generated tokens equal to the first system's
    for key in ("config", "trace", "trace_stats"):
        if key in ok[-1]:
            out[key] = ok[-1][key]
    return out


def summarize(systems: list, meta: dict, opts: Any) -> dict:
    rows = []
    reference: dict[int, list[int]] = {}
    for s in systems:
        entry: dict[str, Any] = {"name": s.name, "kind": s.kind,
                                 "params": {k: v for k, v in s.params.items() if k not in ("cache_dir",)}}
        if s.skip:
            entry.update(status=s.skip_status, reason=s.skip, results=[])
            rows.append(entry)
            continue
        results = []
        for n in opts.prompt_tokens:
            r = _result(n, s.runs.get(n, []), reference.get(n))
            if r["status"] == "ok" and n not in reference and r.get("tokens"):
                reference[n] = r["tokens"]
                r["greedy_prefix_match"] = len(r["tokens"])
            results.append(r)
        oks = [c for n in opts.prompt_tokens for c in s.runs.get(n, []) if c["status"] == "ok"]
        statuses = {r["status"] for r in results}
        entry["status"] = "ok" if statuses == {"ok"} else ("partial" if "ok" in statuses else results[0]["status"])
        if entry["status"] != "ok":
            entry["reason"] = next((r.get("reason") for r in results if r["status"] != "ok"), None)
        size = s.size_bytes if s.size_bytes is not None else next((c.get("size_bytes") for c in oks if c.get("size_bytes")), None)
        entry["size_bytes"] = size
        entry["files"] = s.files or next((c.get("files") for c in oks if c.get("files")), None)
        entry["version"] = s.version or next((c.get("version") for c in oks if c.get("version")), None)
        entry["results"] = results
        rows.append(entry)
    meta = {**meta, "reference_for_greedy_match": next((r["name"] for r in rows if r["status"] in ("ok", "partial")), None)}
    return {"schema": meta["schema"], "meta": meta, "systems": rows, "ratios": ratios(rows)}


def _median(entry: dict, n: int, metric: str, field: str = "median") -> float | None:
    for r in entry.get("results", []):
        if r["prompt_tokens"] == n and r["status"] == "ok" and r.get(metric):
            return r[metric][field]
    return None


# ratio key -> (metric, statistic): medians, and the best run of each side (fastest: the run least
# disturbed by other work on the machine, the usual estimator on a shared machine)
RATIOS = {"prefill": ("prefill_tok_s", "median"), "decode": ("decode_tok_s", "median"), "ttft": ("ttft_ms", "median"),
          "peak_rss": ("peak_rss_mib", "median"), "prefill_best": ("prefill_tok_s", "max"),
          "decode_best": ("decode_tok_s", "max")}


def ratios(rows: list[dict]) -> list[dict]:
    """edge / peer for every edge system, peer and prompt length both measured: prefill and decode
    tokens/s (> 1 = edge faster; medians, and ``*_best`` from each side's fastest run), TTFT and
    peak memory (< 1 = edge lower)."""
    out = []
    edges = [r for r in rows if r["kind"] == "edge"]
    peers = [r for r in rows if r["kind"] != "edge"]
    for e in edges:
        for p in peers:
            for res in e.get("results", []):
                n = res["prompt_tokens"]
                vals = {}
                for key, (metric, field) in RATIOS.items():
                    a, b = _median(e, n, metric, field), _median(p, n, metric, field)
                    vals[key] = (a / b) if a is not None and b else None
                if any(v is not None for v in vals.values()):
                    out.append({"system": e["name"], "vs": p["name"], "peer_kind": p["kind"], "prompt_tokens": n, **vals})
    return out


# ------------------------------------------------------------------------------------------ table
def _fmt(stat: dict | None, digits: int = 0) -> str:
    if not stat:
        return "-"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def table(report: dict) -> str:
    head = f"{'system':<30} {'prompt':>6} {'TTFT ms':>20} {'prefill tok/s':>20} {'decode tok/s':>17} {'peak MiB':>9} {'size MB':>8} {'match':>5}"
    lines = [head, "-" * len(head)]
    for s in report["systems"]:
        size = f"{s['size_bytes'] / 1e6:.0f}" if s.get("size_bytes") else "-"
        if not s["results"]:
            lines.append(f"{s['name']:<30} {s['status']}: {s['reason']}")
            continue
        for r in s["results"]:
            if r["status"] != "ok":
                lines.append(f"{s['name']:<30} {r['prompt_tokens']:>6} {r['status']}: {r.get('reason')}")
                continue
            peak = f"{r['peak_rss_mib']['median']:.0f}" if r.get("peak_rss_mib") else "-"
            match = r.get("greedy_prefix_match")
            lines.append(f"{s['name']:<30} {r['prompt_tokens']:>6} {_fmt(r['ttft_ms'], 1):>20} "
                         f"{_fmt(r['prefill_tok_s']):>20} {_fmt(r['decode_tok_s'], 1):>17} {peak:>9} {size:>8} "
                         f"{'-' if match is None else match:>5}")
    if report["ratios"]:
        lines += ["", "ratios edge / peer (medians; best = fastest run of each; tok/s > 1 = edge faster, memory < 1 = "
                      "edge lower):"]
        for q in report["ratios"]:
            f = {k: ("-" if q.get(k) is None else f"{q[k]:.2f}x") for k in RATIOS}
            lines.append(f"  {q['system']:<22} vs {q['vs']:<15} {q['prompt_tokens']:>5} tok: prefill {f['prefill']:>6} "
                         f"(best {f['prefill_best']:>6})  decode {f['decode']:>6} (best {f['decode_best']:>6})  "
                         f"peak RSS {f['peak_rss']:>6}")
    m = report["meta"]
    machine = (f"{m['machine']['cpu']}, {m['machine']['cores']} cores; {m['threads']} threads per system; "
               f"{m['rounds']} round(s) x {m['repeat']} runs; load average {m['load_average']}; {m['date']}")
    lines += ["", machine, "match = leading greedy tokens equal to those of " + str(m.get("reference_for_greedy_match"))]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def plot(report: dict, path: str | Path) -> list[Path]:
    """Tokens/s (prefill, decode) and peak memory per system and prompt length; a Gantt chart per
    split plan whose prefill left a trace. Returns the PNG paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'edge[bench]'") from None
    path = Path(path)
    lengths = report["meta"]["prompt_tokens"]
    measured = [s for s in report["systems"] if any(r["status"] == "ok" for r in s["results"])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    width = 0.8 / max(1, len(measured))
    panels = (("prefill_tok_s", "prefill tokens/s (higher is better)"), ("decode_tok_s", "decode tokens/s"),
              ("peak_rss_mib", "peak resident memory, MiB (lower is better)"))
    cmap = plt.get_cmap("tab10")
    # a "+lookup" row: its system's colour, hatched (same kernels, another decoding loop)
    base = {s["name"]: s["name"].split(" +lookup")[0] for s in measured}
    colour = {b: cmap(k % 10) for k, b in enumerate(dict.fromkeys(base.values()))}
    for ax, (metric, title) in zip(axes, panels):
        for i, s in enumerate(measured):
            xs, ys, lo, hi = [], [], [], []
            for j, n in enumerate(lengths):
                r = next((r for r in s["results"] if r["prompt_tokens"] == n and r["status"] == "ok"), None)
                if r and r.get(metric):
                    st = r[metric]
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(st["median"])
                    lo.append(st["median"] - st["min"])
                    hi.append(st["max"] - st["median"])
            ax.bar(xs, ys, width * 0.95, yerr=[lo, hi], capsize=2, color=colour[base[s["name"]]], label=s["name"],
                   hatch="//" if base[s["name"]] != s["name"] else None, edgecolor="white")
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(lengths)), [f"{n} tok" for n in lengths])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    m = report["meta"]
    skipped = [f"{s['name']}: {s['status']} ({s.get('reason')})" for s in report["systems"]
               if s["status"] in ("skipped", "failed")]
    # one legend under the panels: inside a panel it covered the first bars' labels
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(measured), 6), fontsize=8,
               bbox_to_anchor=(0.5, 0.04 if skipped else 0.0), frameon=False)
    fig.suptitle(f"edge-bench: {m['machine']['cpu']}, {m['threads']} threads, {m['new_tokens']} new tokens, "
                 f"medians of {m['rounds']}x{m['repeat']} runs (bars: min-max), {m['date'][:10]}", fontsize=10)
    if skipped:
        fig.text(0.01, 0.01, "not measured: " + "; ".join(skipped), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.11 if skipped else 0.07, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written = [path]
    for s in report["systems"]:
        traced = [r for r in s["results"] if r["status"] == "ok" and r.get("trace") and Path(r["trace"]).is_file()]
        if traced:
            from edge.runtime.trace import Trace

            r = traced[-1]  # the longest prompt
            safe = s["name"].replace(" ", "_").replace("/", "_")
            g = path.with_name(f"{path.stem}_gantt_{safe}_{r['prompt_tokens']}.png")
            Trace.load(r["trace"]).gantt(g, title=f"{s['name']}, {r['prompt_tokens']} tokens: "
                                                  + Trace.load(r["trace"]).summary())
            r["gantt"] = str(g)
            written.append(g)
    return written

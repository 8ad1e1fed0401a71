"""Execution traces of a split prefill: Chrome trace JSON, lane busy / bubble fractions, Gantt PNG.

Bubble fraction = 1 - (busiest lane's busy time) / wall time: the share of the prefill during
which even the busiest lane was idle (0 = the schedule is as short as its busiest lane allows).
Open the JSON in chrome://tracing or https://ui.perfetto.dev.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Event:
    name: str        # e.g. "c1.qkv.3"
    stage: str
    chunk: int
    layer: int
    lane: str
    start: float     # seconds from the prefill's start
    end: float


@dataclass
class Trace:
    events: list[Event] = field(default_factory=list)
    lanes: tuple[str, ...] = ("cpu", "accel")
    meta: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return max((e.end for e in self.events), default=0.0) - min((e.start for e in self.events), default=0.0)

    def busy(self) -> dict[str, float]:
        out = {lane: 0.0 for lane in self.lanes}
        for e in self.events:
            out[e.lane] = out.get(e.lane, 0.0) + e.end - e.start
        return out

    def stats(self) -> dict:
        wall, busy = self.wall, self.busy()
        peak = max(busy.values(), default=0.0)
        return {
            "wall_s": wall,
            "tasks": len(self.events),
            "busy_s": busy,
            "busy_fraction": {k: (v / wall if wall else 0.0) for k, v in busy.items()},
            "bubble_fraction": (1.0 - peak / wall) if wall else 0.0,
        }

    def to_chrome(self) -> dict:
        lane_ids = {lane: i for i, lane in enumerate(self.lanes)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": lane}}
                  for lane, i in lane_ids.items()]
        for e in self.events:
            events.append({"name": e.name, "cat": e.stage, "ph": "X", "pid": 0, "tid": lane_ids.setdefault(e.lane, len(lane_ids)),
                           "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6,
                           "args": {"chunk": e.chunk, "layer": e.layer, "stage": e.stage}})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {**self.meta, **self.stats()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e.get("ph") == "M"}
        events = [Event(e["name"], e["args"]["stage"], e["args"]["chunk"], e["args"]["layer"], names[e["tid"]],
                        e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in data["traceEvents"] if e.get("ph") == "X"]
        return cls(events, tuple(names[i] for i in sorted(names)))

    def summary(self) -> str:
        s = self.stats()
        lanes = ", ".join(f"{k} {v * 1e3:.1f} ms ({s['busy_fraction'][k]:.0%})" for k, v in s["busy_s"].items())
        return (f"prefill {s['wall_s'] * 1e3:.1f} ms, {s['tasks']} tasks; busy: {lanes}; "
                f"bubbles {s['bubble_fraction']:.1%}")

    def gantt(self, path: str | Path, title: str = "") -> Path:
        """A Gantt chart PNG (needs matplotlib: ``pip install edge[plot]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise RuntimeError("the Gantt chart needs matplotlib: pip install 'edge[plot]'") from None
        stages = sorted({e.stage for e in self.events}, key=lambda s: min(e.start for e in self.events if e.stage == s))
        colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(stages)}
        fig, ax = plt.subplots(figsize=(14, 1.2 + 0.8 * len(self.lanes)))
        t0 = min((e.start for e in self.events), default=0.0)
        for row, lane in enumerate(self.lanes):
            bars = [((e.start - t0) * 1e3, (e.end - e.start) * 1e3) for e in self.events if e.lane == lane]
            cols = [colors[e.stage] for e in self.events if e.lane == lane]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=cols, edgecolor="none")
        ax.set_yticks(range(len(self.lanes)), self.lanes)
        ax.set_xlabel("ms")
        ax.set_title(title or self.summary(), fontsize=9)
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in stages], labels=stages,
                  ncol=min(len(stages), 10), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

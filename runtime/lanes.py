"""Lanes: onnxruntime sessions on one execution provider plus one worker thread.

A split prefill runs on two lanes, ``cpu`` and ``accel``. The accelerator lane uses what the machine
has (``list_devices``): Qualcomm's QNN execution provider (the ``onnxruntime-qnn`` plugin package:
the Hexagon NPU on an aarch64 board, a Hexagon *simulator* on x86_64), CUDA, XNNPACK, others
onnxruntime was built with, or, when there is none, a second CPU lane with its own thread.
onnxruntime releases the GIL inside ``run()``, so one Python thread per lane is enough.

``accelerator``: ``"auto"`` (best real accelerator, else a second CPU lane; never a simulator),
``"none"`` (the CPU lane alone), or a name from ``list_devices()`` (missing = DeviceError).
"""

from __future__ import annotations

import platform
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnxruntime as ort

from edge.budget import check_threads
from edge.errors import DeviceError

from edge.runtime.sessions import open_session, qdq_unfused, session_options

if TYPE_CHECKING:
    from edge.runtime.shared_weights import SharedWeights


@dataclass(frozen=True)
class Device:
    name: str            # what --accelerator takes
    provider: str        # onnxruntime execution provider
    kind: str            # "npu" | "gpu" | "cpu"
    simulated: bool = False
    note: str = ""

    @property
    def cpu_backed(self) -> bool:
        """Runs on the host's CPU cores: such a lane can run any task (CPU stages included)."""
        return self.kind == "cpu"


# name, provider, kind; in the order "auto" prefers them (real NPUs and GPUs before CPU-side EPs)
KNOWN = (
    ("qnn", "QNNExecutionProvider", "npu"),
    ("rknpu", "RknpuExecutionProvider", "npu"),
    ("vsinpu", "VSINPUExecutionProvider", "npu"),
    ("nnapi", "NnapiExecutionProvider", "npu"),
    ("coreml", "CoreMLExecutionProvider", "npu"),
    ("cuda", "CUDAExecutionProvider", "gpu"),
    ("rocm", "ROCMExecutionProvider", "gpu"),
    ("dml", "DmlExecutionProvider", "gpu"),
    ("openvino", "OpenVINOExecutionProvider", "gpu"),
    ("acl", "ACLExecutionProvider", "cpu"),
    ("xnnpack", "XnnpackExecutionProvider", "cpu"),
)
CPU = Device("cpu", "CPUExecutionProvider", "cpu", note="a second CPU lane with its own thread")
_QNN_LOCK = threading.Lock()
_QNN_REGISTERED: list[bool] = []


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def qnn_ep_devices() -> list:
    """The QNN plugin's OrtEpDevices (registering the plugin library once), or [] without it."""
    try:
        import onnxruntime_qnn  # type: ignore[import-not-found]
    except ImportError:
        return []
    with _QNN_LOCK:
        if not _QNN_REGISTERED:
            try:
                ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
            except Exception:  # already registered by the caller, or the library does not load here
                pass
            _QNN_REGISTERED.append(True)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    npu = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU]
    return npu or devices


def list_devices() -> list[Device]:
    """Accelerators this process can use, best first, then the CPU (always present)."""
    providers = set(ort.get_available_providers())
    found = []
    for name, provider, kind in KNOWN:
        if name == "qnn":
            if qnn_ep_devices():
                sim = not _is_arm()
                found.append(Device(name, provider, kind, simulated=sim,
                                    note="Hexagon HTP simulator (x86_64): correct but slow, for tests" if sim
                                    else "Hexagon HTP (NPU)"))
        elif provider in providers:
            found.append(Device(name, provider, kind))
    return found + [CPU]


def choose_accelerator(accelerator: str) -> Device | None:
    """The device of the accelerator lane: None for "none"; DeviceError for a missing name."""
    if accelerator == "none":
        return None
    devices = list_devices()
    if accelerator == "auto":
        return next(d for d in devices if not d.simulated)
    for d in devices:
        if d.name == accelerator or d.provider == accelerator:
            return d
    names = ", ".join(d.name for d in devices)
    known = ", ".join(n for n, _, _ in KNOWN)
    raise DeviceError(f"accelerator {accelerator!r} is not available here (available: {names}, none, auto; "
                      f"known: {known}). QNN needs `pip install onnxruntime-qnn`; other providers need an "
                      f"onnxruntime build that has them")


def _accelerator_possible() -> bool:
    """Whether "auto" could find a real accelerator, without importing the QNN plugin off ARM
    (on x86 it holds only the HTP simulator, which "auto" never takes)."""
    providers = set(ort.get_available_providers())
    return _is_arm() or any(p in providers for _, p, kind in KNOWN if kind in ("npu", "gpu"))


def pick_plan(plans, accelerator: str = "auto") -> str:
    """The plan for the devices present: split where a real accelerator (NPU/GPU, not a
    simulator) can take its int8 stages, else cpu, else the bundle's default. ``plans``: the
    manifest's edge.plans.Plans."""
    if "split" in plans.names and accelerator != "none" and (accelerator != "auto" or _accelerator_possible()):
        device = choose_accelerator(accelerator)
        if device is not None and device.kind in ("npu", "gpu") and not device.simulated:
            return "split"
    return "cpu" if "cpu" in plans.names else plans.default


@dataclass
class Lane:
    """One execution provider + one worker thread. Lanes with the same provider and thread count
    share sessions (``pool``): concurrent ``run()`` on one session is safe in onnxruntime."""

    name: str
    device: Device
    threads: int = 1
    pool: dict = field(default_factory=dict)
    shared: "SharedWeights | None" = None  # CPU-backed lanes read the model's one weights map
    _worker: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @property
    def key(self) -> tuple:
        return (self.device.provider, self.threads)

    def options(self) -> ort.SessionOptions:
        # No per-session arena: a split plan opens ~240 small sessions and each arena would keep its
        # own peak (docs/quantization.md: memory).
        so = session_options(self.threads, arena=False)
        if self.device.name == "qnn":
            # everything or nothing: a graph the NPU cannot run fully is an error, not a silent CPU run
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            so.add_provider_for_devices(qnn_ep_devices(), {"backend_type": "htp"})
        return so

    def session(self, path: Path | str, unfused_int8: bool = False) -> ort.InferenceSession:
        """``unfused_int8``: a static-int8 graph whose fused int8 GEMM would saturate on this CPU
        (sessions.qdq_unfused); only the CPU EP's own lanes are affected."""
        unfused_int8 = unfused_int8 and self.device.provider == "CPUExecutionProvider"
        key = (str(path), self.key, unfused_int8)
        if key not in self.pool:
            providers = None if self.device.name == "qnn" else list(dict.fromkeys([self.device.provider,
                                                                                  "CPUExecutionProvider"]))
            so = self.options()
            if self.shared is not None and self.device.cpu_backed:
                so = self.shared.session_options(Path(path), so)
            if unfused_int8:
                so = qdq_unfused(so)
            self.pool[key] = open_session(path, so, providers, who=f"lane {self.name} ({self.device.provider})")
        return self.pool[key]

    def submit(self, fn: Callable, *args) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edge-lane-{self.name}")
        return self._worker.submit(fn, *args)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


def make_lanes(accelerator: str = "auto", cpu_threads: int = 1, accel_threads: int = 1,
               shared: "SharedWeights | None" = None) -> dict[str, Lane]:
    """{"cpu": Lane[, "accel": Lane]}; CPU-backed lanes with equal thread counts share sessions, and
    all CPU-backed lanes read ``shared`` weights (the model's) if given."""
    check_threads(cpu_threads, "lane_threads", minimum=1)
    check_threads(accel_threads, "lane_threads", minimum=1)
    pool: dict = {}
    lanes = {"cpu": Lane("cpu", CPU, cpu_threads, pool, shared)}
    device = choose_accelerator(accelerator)
    if device is not None:
        lanes["accel"] = Lane("accel", device, accel_threads, pool, shared)
    return lanes


def describe_devices() -> str:
    """What ``edge-run --devices`` prints."""
    lines = [f"onnxruntime {ort.__version__} on {platform.machine()}; providers: "
             f"{', '.join(ort.get_available_providers())}", "accelerators (--accelerator NAME; auto picks the first "
             "that is not a simulator):"]
    for d in list_devices():
        lines.append(f"  {d.name:<9} {d.provider:<26} {d.kind}{'  ' + d.note if d.note else ''}")
    return "\n".join(lines)

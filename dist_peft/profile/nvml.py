"""A background sampler of this rank's GPU through NVML (nvidia-ml-py's ``pynvml``).

Every ``interval_s`` (default 0.2 s) a daemon thread reads the GPU of this rank's CUDA device: utilisation (%,
the driver's own 1/6–1 s window), memory used, power (W), total energy (mJ counter), SM clock, temperature and
the clock-event (throttle) reason bits. Energy per step is the counter's difference over the measured steps.

The GPU is found by PCI bus id (then UUID) from torch's device properties, never by the CUDA index: under
``CUDA_VISIBLE_DEVICES`` remapping, NVML index i is not CUDA device i (issue 11; the anchors' pynvml note).

Where NVML cannot run (no NVIDIA driver, a CPU-only machine, no CUDA device for this rank) the sampler does
nothing and ``summary()`` says ``unavailable`` with the reason; the run goes on. Each NVML read that a GPU does
not support (e.g. energy on old boards) is left out of the samples, not fatal.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

import torch

THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                    0x100: "display_clocks"}
"""nvmlClocksEventReason bits (``pynvml.nvmlClocksEventReason*``)."""


def pci_bus_id(props: Any) -> str | None:
    """NVML's ``domain:bus:device.function`` string from torch's device properties (None if torch lacks it)."""
    bus, dev, dom = (getattr(props, k, None) for k in ("pci_bus_id", "pci_device_id", "pci_domain_id"))
    if bus is None or dev is None:
        return None
    return f"{dom or 0:08X}:{bus:02X}:{dev:02X}.0"


def _open_handle(nvml: Any, device: torch.device) -> Any:
    """The NVML handle of torch's ``device``: by PCI bus id, else by UUID."""
    props = torch.cuda.get_device_properties(device)
    bus = pci_bus_id(props)
    if bus is not None:
        return nvml.nvmlDeviceGetHandleByPciBusId(bus)
    uuid = str(getattr(props, "uuid", ""))
    if not uuid:
        raise RuntimeError("torch reports neither the PCI bus id nor the UUID of the device")
    return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def _readers(nvml: Any) -> dict[str, Callable[[Any], float]]:
    return {
        "util_pct": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
        "mem_util_pct": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).memory,
        "memory_used_bytes": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used,
        "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
        "energy_mj": lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h),
        "sm_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        "temperature_c": lambda h: nvml.nvmlDeviceGetTemperatureV(h, nvml.NVML_TEMPERATURE_GPU),
        "throttle_bits": lambda h: nvml.nvmlDeviceGetCurrentClocksEventReasons(h),
    }


class NvmlSampler:
    """``with NvmlSampler(device) as s:`` samples in the background; ``s.summary()`` afterwards."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.2, nvml: Any = None):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self.reason: str | None = None
        self.name: str | None = None
        self._nvml, self._handle, self._readers = nvml, None, {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        if self.device.type != "cuda":
            raise RuntimeError(f"this rank runs on {self.device.type}, not a CUDA device")
        if self._nvml is None:
            import pynvml

            self._nvml = pynvml
        self._nvml.nvmlInit()
        self._handle = _open_handle(self._nvml, self.device)
        name = self._nvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self._readers = {}
        for key, read in _readers(self._nvml).items():  # keep the reads this GPU supports
            try:
                read(self._handle)
                self._readers[key] = read
            except Exception:  # noqa: BLE001 — NVMLError_NotSupported and kin: that figure is left out
                pass

    def sample(self) -> None:
        row = {"t": time.perf_counter()}
        for key, read in self._readers.items():
            try:
                row[key] = float(read(self._handle))
            except Exception:  # noqa: BLE001 — a transient read error drops one value, not the sampler
                pass
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "NvmlSampler":
        try:
            self._open()
        except Exception as e:  # noqa: BLE001 — NVMLError_LibraryNotFound / DriverNotLoaded / no CUDA device
            self.reason = f"{type(e).__name__}: {e}"
            return self
        self.sample()
        self._thread = threading.Thread(target=self._run, name="dist-peft-nvml", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 — shutting down is best effort
                pass

    def summary(self, steps: int = 0, tokens: int = 0) -> dict[str, Any]:
        """Means / maxima of the samples, energy over the sampled span (per step and per token when given),
        and the throttle reasons seen; or ``{"available": False, "reason": ...}``."""
        if self.reason is not None or not self.samples:
            return {"available": False, "reason": self.reason or "no samples"}
        out: dict[str, Any] = {"available": True, "gpu": self.name, "samples": len(self.samples),
                               "interval_s": self.interval_s}
        for key in ("util_pct", "mem_util_pct", "power_w", "sm_clock_mhz", "temperature_c", "memory_used_bytes"):
            values = [s[key] for s in self.samples if key in s]
            if values:
                out[key] = {"mean": statistics.fmean(values), "max": max(values)}
        energy = [s["energy_mj"] for s in self.samples if "energy_mj" in s]
        if len(energy) >= 2:
            joules = (energy[-1] - energy[0]) / 1e3
            out["energy_j"] = joules
            if steps:
                out["energy_j_per_step"] = joules / steps
            if tokens:
                out["energy_j_per_token"] = joules / tokens
        bits = 0
        for s in self.samples:
            bits |= int(s.get("throttle_bits", 0))
        out["throttle_reasons"] = [name for bit, name in THROTTLE_REASONS.items() if bits & bit and bit != 0x1]
        return out

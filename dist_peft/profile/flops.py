"""FLOPs, MFU and HFU of measured steps: the accounting's formulas (``dist_peft.accounting``, the ones
``dist-peft plan`` uses) divided by measured time and a peak.

    MFU = model FLOPs / (step time · devices · peak)      model FLOPs: Megatron's formula, every weight trained
    HFU = executed FLOPs / (step time · devices · peak)   executed: frozen weights without weight gradient
                                                          (4T per frozen parameter), the methods' declared work
                                                          and recompute's extra forward

Peak: the dense bf16 tensor-core FLOP/s of ``dist_peft.accounting.roofline``'s GPU table (the planner's; NVIDIA
data sheets, sparsity never counted), picked by the device name; ``--peak-tflops`` overrides it. On a CPU or an
unknown GPU no peak is guessed (torchtitan falls back to A100, which users complain about): MFU and HFU are
omitted with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dist_peft.accounting import ModelShape, flop_breakdown, model_flops
from dist_peft.accounting.roofline import gpu_from_device_name

def device_peak(device_name: str | None, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, where it came from or why it is missing)."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if not device_name or device_name == "cpu":
        return None, "CPU: no tensor-core peak to compare with (give --peak-tflops to set one)"
    gpu = gpu_from_device_name(device_name)
    if gpu is not None:
        return gpu.peak_flops, f"{gpu.name} bf16 dense {gpu.peak_flops / 1e12:g} TFLOP/s (NVIDIA data sheet)"
    return None, f"unknown device {device_name!r}: no peak in the table (give --peak-tflops)"


def step_flops(shape: ModelShape, cfg: Any, tokens: int, data: int, adapters: bool = True) -> dict[str, Any]:
    """Model and executed FLOPs of one step of ``cfg`` over ``tokens`` tokens (all ``data`` data-parallel ranks,
    ``train.grad_accum`` micro-batches each: the executed count is evaluated per micro-batch, ``flop_breakdown``);
    ``adapters=False``: the frozen model alone (the floor)."""
    seq = cfg.data.seq_len
    pipeline, tensor = (cfg.parallel.pipeline, cfg.parallel.tensor) if cfg.parallel else (1, 1)
    method = cfg.method if adapters else None
    forwards = cfg.train.grad_accum * data
    parts = flop_breakdown(shape, tokens // forwards, seq, method, cfg.recompute, pipeline, tensor, forwards, data)
    return {"model": model_flops(shape, tokens, seq), "executed": parts.total,
            "executed_breakdown": dataclasses.asdict(parts)}


def utilisation(flops: dict[str, Any], step_time_s: float, devices: int, peak: float | None,
                why: str) -> dict[str, Any]:
    """Achieved FLOP/s per device, and MFU / HFU against ``peak`` (omitted with ``why`` when None)."""
    per_device = {k: flops[k] / (step_time_s * devices) for k in ("model", "executed")}
    out: dict[str, Any] = {"model_tflops_per_device": per_device["model"] / 1e12,
                           "executed_tflops_per_device": per_device["executed"] / 1e12, "peak_source": why}
    if peak is None:
        out["mfu"] = out["hfu"] = None
        out["mfu_omitted"] = why
    else:
        out["mfu"], out["hfu"] = per_device["model"] / peak, per_device["executed"] / peak
    return out

"""One rank's instruments around one Trainer: phase timer, collective meter, saved-tensor and gradient meters.

``RankProfiler(trainer, settings)`` installs its timer in the engines (the loop's ``trainer.timer``, DeepSpeed's
``ZeroEngine.timer``, megatron's ``config.timers``); ``with prof.step():`` brackets one training step (the
collective meter and the saved-tensor hooks are installed only inside it), and ``record()`` returns this rank's
figures as plain data (gathered over ranks by ``profile.run``).

The frozen floor (``frozen_trainer``): the same model, data, layout and engine with no update at any site —
every adapter is swapped for ``NoUpdate`` and the embedding output requires grad, so backward still computes
every activation gradient (≈ 4N FLOPs per token, the physical limit of any adapter method) and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from dist_peft.parallel import collectives
from dist_peft.profile.comm import CollectiveMeter
from dist_peft.profile.memory import GradientMeter, SavedTensorMeter, allocator_stats, reset_peaks, \
    tensor_categories
from dist_peft.profile.timer import MegatronTimers, PhaseTimer
from dist_peft.profile.trace import TracedTimer


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What ``dist-peft profile`` measures (the CLI flags and the ``profile:`` config section)."""

    steps: int = 10
    """Measured steps per configuration."""
    warmup: int = 2
    """Steps run first and not measured (allocator, autotuning, lazy optimizer state)."""
    exact: bool = False
    """Synchronize the device at every phase mark (host intervals including waits; slower)."""
    saved_tensors: bool = True
    """Measure the bytes saved for backward with saved-tensor hooks."""
    nvml_interval_s: float = 0.2
    """NVML sampling period; 0 turns the sampler off."""
    trace: bool = False
    """Write a bounded PyTorch profiler trace (single configuration only)."""
    trace_ranks: tuple[int, ...] = (0,)
    trace_active: int = 2
    """Steps recorded in the trace (after one waiting and one warm-up step)."""
    peak_tflops: float | None = None
    """Per-device peak for MFU / HFU; None: from the device name (none on CPU)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.trace_active < 1 or self.nvml_interval_s < 0:
            raise ValueError(f"profile settings: steps >= 1, warmup >= 0, trace_active >= 1 and "
                             f"nvml_interval_s >= 0 are required, got {self}")


def _group_names(trainer: Any) -> dict[str, Any]:
    """The run's process groups by axis name (the report's group column); the world is named ``world``."""
    if trainer.mg is not None:
        return {"tp": trainer.mg.layout.tp_group, "pp": trainer.mg.pp_group, "dp": trainer.mg.dp_group,
                "tp×pp": trainer.mg.mp_group}
    if trainer.ds is not None:
        return {"dp (ZeRO)": trainer.ds.dp_group}
    return {}


def _modules(trainer: Any) -> list[nn.Module]:
    if trainer.mg is not None:
        return list(trainer.mg.chunks)
    return [trainer.model]


def attach_timer(trainer: Any, timer: Any) -> None:
    """Hand ``timer`` to the loop and to the engine that runs the step (megatron: its schedules' timers)."""
    trainer.timer = timer
    if trainer.ds is not None:
        trainer.ds.timer = timer
    if trainer.mg is not None:
        from megatron.core.utils import get_model_config

        for chunk in trainer.mg.chunks:
            get_model_config(chunk).timers = MegatronTimers(timer) if isinstance(timer, PhaseTimer) else None


class RankProfiler:
    """This rank's instruments on one Trainer (module docstring)."""

    def __init__(self, trainer: Any, settings: Settings, traced: bool = False):
        self.trainer, self.settings = trainer, settings
        self.device = trainer.rt.device
        self.timer = (TracedTimer if traced else PhaseTimer)(self.device, settings.exact)
        attach_timer(trainer, self.timer)
        self.meter = CollectiveMeter(self.device, _group_names(trainer))
        self.grads = GradientMeter(trainer.optimizer)
        params = [p for m in _modules(trainer) for p in m.parameters()]
        self.saved = SavedTensorMeter(exclude=params) if settings.saved_tensors else None
        self.tokens: list[int] = []
        self.traces: list[dict[str, dict[str, int]]] = []
        self.losses: list[float] = []
        self._index = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Bracket one training step; the caller runs it inside and hands its record to ``add``."""
        saved = self.saved.measuring() if self.saved is not None else contextlib.nullcontext()
        collectives.TRACE.reset()
        with self.meter.installed(), saved, self.timer.step(self._index):
            yield
        self.traces.append(collectives.TRACE.reset())
        self._index += 1

    def add(self, record: dict[str, Any]) -> None:
        """The step's log record (tokens over all data-parallel ranks, loss)."""
        self.tokens.append(int(record["tokens"]))
        self.losses.append(float(record["loss"]))

    def run_step(self) -> dict[str, Any]:
        with self.step():
            record = self.trainer.train_step()
        self.add(record)
        return record

    def memory(self) -> dict[str, Any]:
        t = self.trainer
        adapters = t.controller.adapters.values()
        out = {"allocator": allocator_stats(self.device),
               "tensors": tensor_categories(_modules(t), adapters, t.optimizer, self.grads.bytes)}
        if self.saved is not None:
            out["saved_for_backward"] = {"peak_live": self.saved.peak, "per_step": self.saved.total /
                                         max(self._index, 1)}
        return out

    def record(self) -> dict[str, Any]:
        """This rank's figures for the steps measured so far (plain data, for gathering)."""
        steps = self.timer.collect()
        return {"rank": self.trainer.rt.rank, "device": str(self.device), "device_name": device_name(self.device),
                "steps": [{**s.to_dict(), "tokens": n, "loss": loss, "collectives": c}
                          for s, n, loss, c in zip(steps, self.tokens, self.losses, self.traces)],
                "collectives": self.meter.report(len(steps)), "memory": self.memory(),
                "trainable": sum(p.numel() for p in self.trainer.params.values())}

    def recent(self) -> dict[str, float]:
        """Flat figures of the steps since the last call (this rank), for a training run's metric log."""
        steps = self.timer.collect()
        if not steps:
            return {}
        out = {"profile/step_s": statistics.median(s.time_s for s in steps)}
        for name in {k for s in steps for k in s.phases}:
            out[f"profile/phase/{name}_s"] = statistics.median(s.phases.get(name, 0.0) for s in steps)
        alloc = allocator_stats(self.device)
        out.update({f"profile/memory/{k}": v for k, v in alloc.items() if isinstance(v, (int, float))})
        if self.saved is not None:
            out["profile/memory/saved_for_backward_peak"] = self.saved.peak
        self.tokens, self.traces, self.losses = [], [], []
        return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class NoUpdate(nn.Module):
    """The site's frozen base alone (the floor): no parameters, no update, no layouts to reduce."""

    def forward_site(self, x: Tensor, base: Any) -> Tensor:
        return base(x)

    def param_layouts(self) -> dict[str, Any]:
        return {}


def _requires_grad_output(_module: nn.Module, _args: Any, out: Any) -> Any:
    return out.requires_grad_(True) if isinstance(out, Tensor) and not out.requires_grad else out


def frozen_trainer(cfg: Any, echo: Any = None) -> Any:
    """A Trainer of ``cfg``'s model, data and layout with no update at any site (module docstring). The sites are
    built as LoRA sites (a method every engine runs without calibration) and then emptied. DeepSpeed ZeRO-1/2
    partition only trainable state, so the floor runs on the plain engine; under ZeRO-3 it is refused (the
    frozen weights' gathers belong to the floor but would need a DeepSpeed engine without trainable tensors)."""
    from dist_peft.methods.base import Controller, get_method
    from dist_peft.train.config import ConfigError, MethodConfig
    from dist_peft.train.loop import Trainer

    if cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("profile: the frozen floor under ZeRO-3 is not supported; profile with --no-frozen")
    method = MethodConfig(name="lora", target_modules=cfg.method.target_modules,
                          options=get_method("lora").config_cls())
    base_cfg = dataclasses.replace(cfg, method=method, deepspeed=None)
    trainer = Trainer(base_cfg, echo=echo or (lambda _m: None))
    sites = trainer.mg.sites.values() if trainer.mg is not None else \
        [m for m in trainer.model.modules() if hasattr(m, "adapter") and hasattr(m, "base_layer")]
    for site in sites:
        site.adapter = NoUpdate()
    for module in _embeddings(trainer):
        module.register_forward_hook(_requires_grad_output)
    data_group = trainer.controller.data_group
    trainer.params, trainer.controller = {}, Controller({})
    trainer.controller.data_group = data_group
    return trainer


def _embeddings(trainer: Any) -> list[nn.Module]:
    if trainer.mg is None:
        return [trainer.model.get_input_embeddings()]
    return [chunk.embedding for chunk in trainer.mg.chunks if getattr(chunk, "pre_process", False)]

"""What a training run logs beyond metrics.jsonl: the profiler's figures every ``profile.every`` steps (a
``profile:`` config section) and every logged record to TensorBoard (``log.tensorboard: DIR``) and Weights &
Biases (``log.wandb: PROJECT``, when the package is installed; ``WANDB_MODE=offline`` works without a network).

Rank 0 writes (as metrics.jsonl); the profiled figures are rank 0's own (no collective is added to the run: the
cross-rank spread is ``dist-peft profile``'s job). Without either section ``step()`` is one shared null context
and ``write`` does nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

_NULL = contextlib.nullcontext()


class TrainMonitor:
    def __init__(self, trainer: Any):
        cfg = trainer.cfg
        self.profiler = None
        self.every = 0
        if getattr(cfg, "profile", None) is not None:
            from dist_peft.profile.session import RankProfiler, Settings

            p = cfg.profile
            self.every = p.every
            self.profiler = RankProfiler(trainer, Settings(exact=p.exact, saved_tensors=p.saved_tensors,
                                                           nvml_interval_s=0))
        log = getattr(cfg, "log", None)
        self.main = trainer.rt.is_main
        self.tensorboard_dir = log.tensorboard if log is not None and self.main else None
        self.wandb_project = log.wandb if log is not None and self.main else None
        self._tb = self._wandb = None
        self._config = cfg.to_dict()

    def step(self) -> contextlib.AbstractContextManager:
        """Bracket one training step."""
        return self.profiler.step() if self.profiler is not None else _NULL

    def add(self, record: dict[str, Any]) -> None:
        """Every ``profile.every`` steps: the profiled figures of the steps since the last time, into ``record``."""
        if self.profiler is None:
            return
        self.profiler.add(record)
        if record["step"] % self.every == 0:
            record.update(self.profiler.recent())

    def write(self, record: dict[str, Any]) -> None:
        """One logged record (a step's or an evaluation's) to TensorBoard and W&B, by its step."""
        if self.tensorboard_dir is None and self.wandb_project is None:
            return
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard_dir is not None:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.tensorboard_dir)
            for key, value in scalars.items():
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self._tb.flush()
        if self.wandb_project is not None:
            run = self._wandb_run()
            if run is not None:
                run.log(scalars, step=step)

    def _wandb_run(self) -> Any:
        if self._wandb is None:
            try:
                import wandb
            except ImportError:
                warnings.warn("log.wandb is set but wandb is not installed (pip install wandb); not logging to W&B")
                self.wandb_project = None
                return None
            self._wandb = wandb.init(project=self.wandb_project, config=self._config)
        return self._wandb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

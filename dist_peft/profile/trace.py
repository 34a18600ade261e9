"""A bounded PyTorch profiler trace of a few steps, rank-tagged and gzipped, that Perfetto and HTA open.

``torch.profiler.schedule(wait, warmup, active, repeat=1)``: ``active`` steps (2–3) are recorded once, so the
file's size does not grow with the run. Only the ranks asked for record (default rank 0). Each phase of the
step timer and each adapter site's forward are named ranges (``record_function``): ``phase:forward``,
``adapter:model.layers.0.self_attn.q_proj``. The file is ``trace_rank{R}.json.gz`` and holds
``distributedInfo`` with the rank and world size (HTA refuses traces without it; torch writes it only when a
process group exists, so it is added for a single process).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from dist_peft.profile.timer import PhaseTimer


class TracedTimer(PhaseTimer):
    """A PhaseTimer whose phases are also ``phase:<name>`` ranges in the trace (the range's own cost is inside the
    phase it names, not in the unaccounted remainder)."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with super().phase(name), record_function(f"phase:{name}"):
            yield


def adapter_ranges(sites: Iterable[tuple[str, nn.Module]]) -> list[Any]:
    """Forward hooks that open ``adapter:<site>`` around each adapted module's forward; returns the handles
    (remove them when the trace ends)."""
    handles = []
    for name, module in sites:
        ranges: list[Any] = []

        def enter(_m, _args, ranges=ranges, label=f"adapter:{name}"):
            r = record_function(label)
            r.__enter__()
            ranges.append(r)

        def leave(_m, _args, _out, ranges=ranges):
            if ranges:
                ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


class StepTrace:
    """``with StepTrace(out_dir, rank, world, ...) as t:`` then ``t.step()`` after every step."""

    def __init__(self, out_dir: str | Path, rank: int, world: int, device: torch.device, wait: int = 1,
                 warmup: int = 1, active: int = 2):
        self.path = Path(out_dir) / f"trace_rank{rank}.json.gz"
        self.rank, self.world = rank, world
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active,
                                                                      repeat=1),
                             on_trace_ready=self._write, record_shapes=False, with_stack=False)
        self.steps_needed = wait + warmup + active
        self.written: Path | None = None

    def _write(self, prof: Any) -> None:
        """Export, add ``distributedInfo`` where torch left it out (one process), gzip, rename into place."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            raw = Path(tmp, "trace.json")
            prof.export_chrome_trace(str(raw))
            trace = json.loads(raw.read_text())
            trace.setdefault("distributedInfo", {"rank": self.rank, "world_size": self.world, "backend": None})
            with gzip.open(Path(tmp, "trace.json.gz"), "wt") as f:
                json.dump(trace, f)
            os.chmod(Path(tmp, "trace.json.gz"), 0o644)
            os.replace(Path(tmp, "trace.json.gz"), self.path)
        self.written = self.path

    def __enter__(self) -> "StepTrace":
        self._prof.__enter__()
        return self

    def step(self) -> None:
        self._prof.step()

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)

"""Let megatron-core 0.16 run on a CPU-only torch build (gloo), for tests and CPU development.

megatron-core hard-codes ``torch.cuda`` calls and ``device="cuda"`` in its RNG tracker, rotary embedding,
attention buffers and pipeline schedules. ``apply()`` patches exactly those, process-wide, and is a no-op
when CUDA is available, so GPU runs never see it. Verified against megatron-core 0.16.1 (shared notes
cpu_stack.md §8): TP, PP and interleaved PP reproduce single-process losses exactly with these patches.

  * RNG tracker: keeps CPU generator states instead of CUDA ones (dropout inside ``get_cuda_rng_tracker``); its
    ``fork`` without megatron's "CPU RNG state changed within GPU RNG context" check, which compares the CPU state
    with itself here and reads the comparison on the host (``.item()``) at every fork (under sequence parallelism
    every layer block and embedding forks).
  * ``torch.cuda.current_device`` → the CPU device; ``synchronize`` / ``empty_cache`` → no-ops.
  * pipeline schedules run under ``CudaToCpuMode``, which rewrites ``device="cuda"`` tensor factories.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _fix_device(d):
    if (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda"):
        return torch.device("cpu")
    if isinstance(d, int) and not isinstance(d, bool):
        return torch.device("cpu")
    return d


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites device='cuda' (and Tensor.cuda()) to the CPU for every torch call made inside it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _fix_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def _tracker_add(self, name, seed):
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name: str = "model-parallel-rng"):
    """megatron's ``CudaRNGStatesTracker.fork`` with the CPU generator as the device one: run the block under
    state ``name``, keep the state it leaves, restore the state (and state name) the block began with."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state, orig_name = torch.get_rng_state(), self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same as the desired "
                            f"state name {name}.")
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(self.states_[orig_name] if orig_name != "default-rng" else orig_state)
        self._current_state_name = orig_name


def _patch_schedules() -> None:
    import megatron.core.pipeline_parallel.schedules as schedules

    for name in ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
                 "forward_backward_pipelining_with_interleaving"):
        original = getattr(schedules, name)

        @functools.wraps(original)
        def wrapped(*args, __original=original, **kwargs):
            with CudaToCpuMode():
                return __original(*args, **kwargs)

        setattr(schedules, name, wrapped)


def apply() -> None:
    """Patch megatron-core for CPU once per process; does nothing when CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.random as rng

    rng._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    rng.CudaRNGStatesTracker.add = _tracker_add
    rng.CudaRNGStatesTracker.fork = _tracker_fork
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    _patch_schedules()  # before get_forward_backward_func() reads the module globals
    _APPLIED = True

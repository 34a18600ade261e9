"""The adapter contract: a ``Site`` (the frozen base linear), an ``Adapter`` that adds its update to the base
output in the base output's layout, a model-wide ``Controller`` for work between steps, and the registry.

An adapter is parallel-agnostic: it receives a ``ShardSpec`` and holds the *local shard* of its parameters.
``param_layouts`` states, for each trainable tensor, which dimension follows the split and whether its gradient
on one rank is a partial sum over the group (a replicated factor that meets a split dimension). Engines use it
to cut full tensors into shards, to gather them for saving, and to reduce partial gradients once per step.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dist_peft.parallel.shard import ShardKind, ShardSpec


@dataclass(frozen=True)
class Site:
    """The frozen base linear y = W x an adapter is attached to."""

    name: str
    """Module path in the model, e.g. ``model.layers.0.self_attn.q_proj``."""
    module_type: str
    """Canonical projection name (``q_proj`` … ``down_proj``)."""
    layer_index: int | None
    out_features: int
    """m, global (unsplit)."""
    in_features: int
    """n, global (unsplit)."""
    weight: Tensor
    """The local shard of W as the base layer holds it (frozen; never copied by an adapter)."""
    bias: Tensor | None = None
    """The bias b the base output includes (y = W x + b), local; None when the base adds none before the adapter
    sees its output (no bias, or a row-parallel partial sum whose bias is added after the reduction)."""
    batch_dim: int = 0
    """The input's dimension that indexes samples: 0 for transformers' [b, s, h], 1 for megatron's [s, b, h]
    (read by methods with per-sample behaviour, FO-LoRA's task ids)."""


@dataclass(frozen=True)
class SiteShape:
    """The shape-only twin of ``Site`` for accounting (``dist_peft.accounting``): one site of a model that need not
    exist, as one rank of a tensor-parallel split holds it."""

    module_type: str
    out_features: int
    """m, global."""
    in_features: int
    """n, global."""
    kind: ShardKind = ShardKind.REPLICATED
    tp: int = 1
    """Ranks of the split (1: replicated)."""
    layers: int = 1
    """Sites of this module type in the whole model (state shared by a module type, FRoD's bases)."""
    weight_bytes: int = 2
    """Bytes per element of the frozen W (2: bf16)."""

    @property
    def m_local(self) -> int:
        return self.out_features // self.tp if self.kind is ShardKind.COLUMN else self.out_features

    @property
    def n_local(self) -> int:
        return self.in_features // self.tp if self.kind is ShardKind.ROW else self.in_features


@dataclass(frozen=True)
class ParamLayout:
    shard_dim: int | None
    """Dimension of the tensor that follows the site's split (None: the same full tensor on every rank)."""
    partial_grad: bool
    """True when each rank's gradient is a partial sum that must be summed over the split's group."""


class Controller:
    """Model-wide hooks of one method, called by the training loop once per optimizer step.

    ``before_optimizer_step`` runs after backward, gradient accumulation and every gradient reduction;
    ``after_optimizer_step`` runs after ``optimizer.step()``. A method that batches small per-layer reductions
    does it here, in one coalesced collective for all its layers.
    """

    data_group: Any = None
    """The data-parallel process group (None: the world). An engine whose world also holds model-parallel
    ranks sets it, for controllers that reduce statistics over the data (FO-LoRA's calibration)."""
    layer_group: Any = None
    """The group whose ranks hold the other layers (pipeline stages; None: every layer is here). An engine that splits
    the layers sets it, for model-wide sums of per-site statistics (FO-LoRA's predicted loss change)."""

    def __init__(self, adapters: Mapping[str, "Adapter"]):
        self.adapters = dict(adapters)

    def on_batch(self, batch: Mapping[str, Tensor]) -> None:
        """Called before each micro-batch's forward with the collated batch (e.g. per-sample task ids)."""

    def before_optimizer_step(self, ctx: "StepContext") -> None:
        """Default: nothing to do (LoRA)."""

    def gradient_access(self, step: int) -> str:
        """What ``before_optimizer_step`` of optimizer step ``step`` (asked after that step's backward) does with the
        trainable tensors' ``.grad``, for engines that partition gradients over the data ranks (ZeRO; others ignore
        it): ``"whole"`` reads whole gradients (a collective to assemble them); ``"local"`` only maps each element
        to a new value of that element alone or drops a tensor's gradient (sets None) by replicated state, so the
        engine passes each rank its own part, zeros elsewhere, and keeps its own part of the result (no
        collective); ``"none"`` neither reads nor writes any ``.grad``. Default ``"whole"``: right for any hook."""
        return "whole"

    def value_access(self, hook: str, ctx: "StepContext") -> bool:
        """Whether hook ``hook`` (``"before_optimizer_step"`` or ``"after_optimizer_step"``) of the step ``ctx``
        reads or writes the values of trainable tensors, for engines that partition them (ZeRO-3 gathers them only
        then, ZeRO-1/2 write them back only then). Default True: right for any hook."""
        return True

    def after_optimizer_step(self, ctx: "StepContext") -> None:
        """Default: nothing to do (LoRA)."""

    def on_skipped_step(self, ctx: "StepContext") -> None:
        """The step's loss or gradients were not finite: no hook ran, no update was made, and step ``ctx.step`` comes
        again with new data (``train/guards.py``). Drop what the step's forward/backward gathered. Default: nothing."""

    def state_dict(self) -> dict[str, Tensor]:
        """Method state that a checkpoint must hold to resume exactly (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} holds no state, but the checkpoint has {sorted(state)}")


def hook_access(controller: Controller, hook: str, ctx: "StepContext") -> tuple[str, bool]:
    """(gradients, values) that hook ``hook`` of step ``ctx`` declares (``Controller.gradient_access``, ``none`` for
    an after-step hook; ``value_access``), refusing an unknown gradient access on every rank alike, before any
    collective of an engine's view."""
    grads = controller.gradient_access(ctx.step) if hook == "before_optimizer_step" else "none"
    if grads not in ("whole", "local", "none"):
        raise ValueError(f"{type(controller).__name__}.gradient_access: {grads!r} is not 'whole', 'local' or 'none'")
    return grads, controller.value_access(hook, ctx)


@contextlib.contextmanager
def declared_access(controller: Controller, hook: str, ctx: "StepContext",
                    params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Runs a controller hook held to its declarations (``Controller.gradient_access``, ``value_access``) in every
    engine, so that a wrong one fails the single-process reference tests instead of silently losing work where a
    partitioning engine skips what was declared unneeded: with ``"none"`` gradients (every after-step hook) each
    ``.grad`` is hidden (None) inside and restored after, and one set inside is an error; without values, an
    in-place write to one (its version counter moves) is an error. Host-side checks only, no device work."""
    grads, values = hook_access(controller, hook, ctx)
    versions = None if values else {n: p._version for n, p in params.items()}
    hidden = {n: p.grad for n, p in params.items()} if grads == "none" else None
    for p in params.values() if hidden is not None else ():
        p.grad = None
    try:
        yield
        bad = [f"{n}.grad" for n, p in params.items() if hidden is not None and p.grad is not None]
        bad += [n for n, p in params.items() if versions is not None and p._version != versions[n]]
        if bad:
            raise RuntimeError(f"{type(controller).__name__}.{hook} of step {ctx.step} wrote {', '.join(bad[:3])}, "
                               f"which it declared not to touch (gradient_access {grads!r}, value_access "
                               f"{versions is None}): fix its declaration")
    finally:
        for n, p in params.items() if hidden is not None else ():
            p.grad = hidden[n]


@dataclass(frozen=True)
class StepContext:
    step: int
    """Optimizer steps completed before this one (0 for the first step)."""
    lr: float
    """The learning rate this step uses."""
    optimizer: torch.optim.Optimizer
    total_steps: int = 0
    """Optimizer steps of the whole run (0: unknown), for schedules that depend on the run's length."""
    optim_state: Any = None
    """Per-parameter access to the optimizer's state (``dist_peft.train.optim_state.OptimizerState``); None
    builds the ``torch.optim`` one from ``optimizer``. An engine with partitioned states passes its own."""
    gathered: Callable[..., contextlib.AbstractContextManager] = lambda tensors, modify=False: contextlib.nullcontext()
    """``with ctx.gathered(tensors, modify=False):`` holds the whole value of tensors that an engine partitions
    (ZeRO-3 also partitions the frozen base weights, ``Site.weight``) on every rank; with ``modify=True`` the
    values written inside are kept (every rank must write the same). A collective under ZeRO-3
    (``integrations.deepspeed.gathered``); the default, for engines that partition nothing, does nothing."""

    def __post_init__(self) -> None:
        if self.optim_state is None:
            from dist_peft.train.optim_state import TorchOptimizerState  # lazy: train imports methods

            object.__setattr__(self, "optim_state", TorchOptimizerState(self.optimizer))


class Adapter(nn.Module, abc.ABC):
    """One method's update on one site. Subclasses set ``trainable_names`` and implement the math."""

    trainable_names: ClassVar[tuple[str, ...]] = ()
    """Names of the trainable tensors; freezing, optimizer groups and save/load read this one declaration."""
    file_keys: ClassVar[Mapping[str, str]] = {}
    """Key of each trainable tensor in adapter files, below the site's path (default: its name)."""
    buffer_names: ClassVar[tuple[str, ...]] = ()
    """Non-trainable tensors that are part of the update (e.g. OD-LoRA's bases): written to adapter files beside
    the trainable ones and restored by ``load_adapter``; never optimized (default: none)."""
    controller_cls: ClassVar[type[Controller]] = Controller
    size_knob: ClassVar[str | None] = None
    """The config field that sets the update's size (``r``, ``n_frequency``, ...): ``dist-peft compare`` moves it to
    match trainable-parameter budgets across methods."""
    method_name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object

    def __init__(self, site: Site, spec: ShardSpec, cfg: Any):
        super().__init__()
        self.site = site
        self.spec = spec
        self.cfg = cfg

    @abc.abstractmethod
    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        """Return ``base_out`` plus the update, in the base output's layout (local / partial for row)."""

    @abc.abstractmethod
    def delta_weight(self) -> Tensor:
        """The local shard of ΔW (same shape as ``site.weight``), for merging."""

    @abc.abstractmethod
    def param_layouts(self) -> dict[str, ParamLayout]:
        """The layout of each trainable tensor under this adapter's ShardSpec."""

    def buffer_layouts(self) -> dict[str, ParamLayout]:
        """The layout of each tensor in ``buffer_names`` (for gathering them into adapter files). Default: none."""
        return {}

    # Accounting (``dist_peft.accounting``): what one site costs, declared beside the math so that the planner's and
    # the profiler's figures change where the method changes. Shapes are one rank's (``SiteShape.m_local``, ...).

    @classmethod
    def trainable_numel(cls, shape: SiteShape, cfg: Any) -> int:
        """Elements of this site's trainable tensors on one rank (``trainable_names``, local shards)."""
        raise NotImplementedError(f"{cls.__name__} declares no trainable_numel")

    @classmethod
    def group_numels(cls, shape: SiteShape, cfg: Any) -> tuple[int, ...]:
        """``trainable_numel`` split by optimizer group, in the order ``optimizer_overrides`` makes them (the run's
        group first); DeepSpeed's ZeRO flattens, pads and steps each group on its own. Default: one group."""
        return (cls.trainable_numel(shape, cfg),)

    @classmethod
    def cast_numel(cls, shape: SiteShape, cfg: Any) -> int:
        """Elements of the trainable tensors that a GEMM reads as its weight, whose activation-dtype copy it saves
        when the activations are narrower (fp32 adapters under bf16 autocast). Default: all of them."""
        return cls.trainable_numel(shape, cfg)

    @classmethod
    def buffer_bytes(cls, shape: SiteShape, cfg: Any) -> tuple[int, int]:
        """(bytes of this site's own non-trainable state on one rank, bytes of state shared by all sites of its
        module type on one rank, counted once). Default: none."""
        return 0, 0

    @classmethod
    def extra_flops(cls, shape: SiteShape, tokens: int, cfg: Any) -> tuple[int, int]:
        """(forward, backward) FLOPs of the update for ``tokens`` tokens through this site on one rank, beyond the
        frozen base's GEMMs. Default, a two-factor update y += B(Ax) with P = trainable_numel: 2PT forward,
        4PT backward (input and weight gradients)."""
        p = cls.trainable_numel(shape, cfg)
        return 2 * p * tokens, 4 * p * tokens

    @classmethod
    def saved_bytes(cls, shape: SiteShape, cfg: Any, act_bytes: int) -> int:
        """Bytes per token the update saves for backward beyond the site's input (which the accounting counts
        once per input, shared by the sites that read it). Default: none."""
        return 0

    @classmethod
    def forward_saved_bytes(cls, shape: SiteShape, cfg: Any, act_bytes: int, tokens: int, samples: int) -> int:
        """Bytes the update saves for backward in one forward over ``tokens`` tokens of ``samples`` sequences (one
        micro-batch), beyond the site's input: a method overrides it where that set depends on the micro-batch (a
        path chosen per forward, a tensor per sample) or holds tensors of weight size (once per forward, not per
        token). Default: ``tokens`` · ``saved_bytes``."""
        return tokens * cls.saved_bytes(shape, cfg, act_bytes)

    @classmethod
    def saves_input(cls, shape: SiteShape, cfg: Any, tokens: int) -> bool:
        """Whether a forward over ``tokens`` tokens saves the site's input x for backward (the accounting counts it
        once per input). Default: yes (x's product with a trainable factor)."""
        return True

    @classmethod
    def step_flops(cls, shape: SiteShape, cfg: Any) -> int:
        """FLOPs of between-step work per optimizer step (merges, solves, QR), averaged over its interval."""
        return 0

    @classmethod
    def width_costs(cls, shape: SiteShape, cfg: Any) -> tuple[str, ...]:
        """Costs that grow faster than the site's m·n (n³, n² per module type): one line each, to be flagged."""
        return ()

    @classmethod
    def prepare(cls, sites: Sequence[Site], cfg: Any, specs: Mapping[str, ShardSpec | None] | None = None,
                layer_group: Any = None) -> dict[str, dict[str, Any]]:
        """Model-wide work before any adapter exists (e.g. a decomposition shared by all layers of a module
        type): returns extra constructor keyword arguments per site name (this process's sites). Default: none.

        ``sites`` are this process's sites, each holding its local shard of W. ``specs`` maps a site name to the
        ShardSpec of its split (absent or None: unsplit), the spec its adapter will be built with. ``layer_group``
        is the process group of the ranks that hold the model's *other layers* (the pipeline group; None: this
        process holds every layer). Every rank of the world calls prepare at the same point, so an override may
        issue collectives over the specs' groups, ``layer_group`` and the world (the same ones, in the same order,
        on every rank); the default, which has no model-wide work, ignores both."""
        return {}

    def unmerge_delta(self, merged_weight: Tensor) -> Tensor:
        """The ΔW that unmerge subtracts from the merged weight (the base layer's, W + ΔW). Default:
        ``delta_weight()``, right for updates that do not depend on W; a method whose ΔW is a function of W
        (FRoD: ΔW = W K) recovers it from ``merged_weight``."""
        return self.delta_weight()

    def forward_site(self, x: Tensor, base: Callable[[Tensor], Tensor]) -> Tensor:
        """The adapted site's output from its input and the frozen base layer as a function (x -> W x + b, in the
        base's layout). Default: ``forward(x, base(x))``. A method whose update acts on the input (y = base(x̃),
        FRoD) overrides this so that the base runs once on x̃ instead of adding W(x̃ - x) afterwards."""
        return self(x, base(x))

    def optimizer_overrides(self) -> dict[str, dict[str, float]]:
        """Optimizer options that differ from the run's for some trainable tensors, e.g. ``{"loc": {"lr":
        1e-4}}``; an ``lr`` here follows the run's warmup/decay schedule in proportion. Default: none."""
        return {}

    def validate_loaded(self, tensors: Mapping[str, Tensor]) -> None:
        """Raise ValueError if tensors read from an adapter file (full, by trainable name; already checked
        for shape and finiteness) hold values this method cannot use. Default: accept."""

    @staticmethod
    def peft_config(cfg: Any, target_modules: list[str]) -> dict[str, Any] | None:
        """The HF PEFT ``adapter_config.json`` fields for this method, or None when PEFT has no equivalent."""
        return None

    def file_key(self, name: str) -> str:
        return self.file_keys.get(name, name)

    @torch.no_grad()
    def load_full(self, full: Mapping[str, Tensor]) -> None:
        """Copy full (unsplit) tensors into this shard's parameters, slicing along each layout's shard_dim."""
        for name, layout in self.param_layouts().items():
            t = full[name]
            if layout.shard_dim is not None:
                t = self.spec.shard(t, layout.shard_dim)
            param = getattr(self, name)
            if t.shape != param.shape:
                raise ValueError(f"{self.site.name}.{name}: expected shape {tuple(param.shape)}, got {tuple(t.shape)}")
            param.copy_(t)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    adapter_cls: type[Adapter]
    config_cls: type


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type):
    """Class decorator: the single registration of a method under ``name`` with its config dataclass."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.method_name, cls.config_cls = name, config_cls
        _REGISTRY[name] = MethodEntry(name, cls, config_cls)
        return cls

    return wrap


def get_method(name: str) -> MethodEntry:
    import dist_peft.methods  # noqa: F401  (importing the package registers every method)

    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def config_fields(config_cls: type) -> list[str]:
    return [f.name for f in fields(config_cls)]

"""The run configuration: YAML → typed, validated, frozen dataclasses.

Every field is checked when the file is read, before a model, a process group or a collective exists: an
unknown key or a bad value is one ``ConfigError`` naming the key (``train.lr: must be > 0, got -1``).
The method section is open: ``name`` and ``target_modules`` are common, every other key goes to the method's
own config dataclass (``methods/<name>.py``), whose validation errors are reported the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_peft.methods.base import get_method


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message starts with the key's path."""


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    """A random Llama built in code (tests and CI; no weights on disk)."""

    vocab_size: int = 260
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    """Width of a head (None: hidden_size / num_attention_heads); set it for the shapes one tensor-parallel rank
    multiplies (Llama-3.1-8B under TP2: hidden 4096, 16/4 heads of 128)."""
    tie_word_embeddings: bool = False
    initializer_range: float = 0.15
    """Std of the random weights; larger than Llama's 0.02 so that a frozen random head has logits an
    adapter can move in a few steps."""
    seed: int = 0
    """Seed of the random weights: the same seed gives the same model in every process."""

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim")
        if (self.head_dim is None and self.hidden_size % self.num_attention_heads) \
                or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads: must divide hidden_size and be a multiple of num_key_value_heads")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str
    """``tiny-llama``, a packaged model (``smollm2-135m-instruct``) or a local Hugging Face model folder."""
    preset: str | None = None
    """A model preset of ``configs/models`` (``llama-3.1-70b``, ...): ``dist-peft plan`` sizes the run from it, and
    ``train`` first checks that the folder ``source`` holds a model of that shape (``accounting/presets.py``)."""
    task: Literal["causal_lm", "classification"] = "causal_lm"
    num_labels: int | None = None
    """Classification only: the number of classes (the new head is trained, see ``trainable_modules``)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the frozen base weights (adapters always keep fp32 master weights)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trainable_modules: tuple[str, ...] = ()
    """Modules trained in full beside the adapters (e.g. ``score`` for a new classification head)."""

    def __post_init__(self) -> None:
        if self.task == "classification" and not self.num_labels:
            raise ValueError("num_labels: required (>= 2) when task is classification")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    name: str = "lora"
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    options: Any = None
    """The method's own config dataclass, built from the section's other keys."""

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One dataset and how its rows become token sequences: the keys of ``data`` and of each ``data.tasks``
    entry."""

    source: Literal["chatterbot", "bbc_news", "synthetic", "files", "json"] | None = None
    """Packaged datasets (``chatterbot``, ``bbc_news``), random tokens (``synthetic``), or local files
    (``files``, with ``path``: a .jsonl / .json / .parquet file, a folder of them, or a ``datasets``
    save_to_disk folder; ``json`` is the same for a JSON-lines file). Required, except in a ``data`` section
    that lists ``tasks``."""
    format: Literal["causal_lm", "instruction", "classification"] = "causal_lm"
    """causal_lm: texts packed into blocks of seq_len; instruction: prompt/response pairs with the loss on the
    response only; classification: text and integer label."""
    path: str | None = None
    seq_len: int = 128
    eval_examples: int = 64
    """Held out for evaluation (examples, or packed blocks for causal_lm), drawn before any training data."""
    max_examples: int | None = None
    """Use at most this many training examples (blocks for causal_lm)."""
    seed: int = 0
    """Seed of the train/eval split and of the epoch order."""
    order_seed: int | None = None
    """Seed of the training order alone (epoch permutations; with ``tasks``, the mixture too), leaving the split and
    so the held-out set as ``seed`` draws them (``dist-peft compare``'s ``vary_data_order``); None: ``seed``."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    label_field: str = "label"
    synthetic_examples: int = 256

    @property
    def epoch_seed(self) -> int:
        """The seed of the training order: ``order_seed``, else ``seed``."""
        return self.seed if self.order_seed is None else self.order_seed

    def __post_init__(self) -> None:
        _positive(self, "seq_len", "max_examples", "synthetic_examples")
        _positive(self, "eval_examples", allow_zero=True)
        if (self.source in ("files", "json")) != (self.path is not None):
            raise ValueError("path: required exactly when source is files or json")
        if self.source == "synthetic" and self.format != "causal_lm":
            raise ValueError(f"format: synthetic data is causal_lm only, got {self.format}")


@dataclass(frozen=True, kw_only=True)
class TaskConfig(SourceConfig):
    """One task of a multitask run: a dataset with its own held-out set and metrics. Keys a task does not set
    are taken from the ``data`` section (``seq_len``, ``seed``, ``eval_examples``, …)."""

    name: str
    """Metrics are logged per task as ``eval_<name>_loss`` (…_accuracy, …_ppl); letters, digits, ``_``, ``-``."""
    weight: int = 1
    """Share of the training mixture: every Σ weight consecutive examples hold exactly ``weight`` of this task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source is None:
            raise ValueError("source: required for every task")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"name: letters, digits, _ and - only, got {self.name!r}")
        _positive(self, "weight")


@dataclass(frozen=True, kw_only=True)
class DataConfig(SourceConfig):
    tasks: tuple[TaskConfig, ...] = ()
    """Multitask training (e.g. FO-LoRA): one entry per task, task id = position in this list. Training
    batches mix the tasks in proportion to their weights (``data.MixedOrder``); each is evaluated apart."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tasks and self.source is not None:
            raise ValueError("source: give either data.source or data.tasks (each with its own source), not both")
        if not self.tasks and self.source is None:
            raise ValueError("source: required (or list data.tasks)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique, got {names}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Examples per forward/backward on one data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the step's tokens, so k micro-batches of b
    equal one batch of k·b."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr · min_lr_ratio."""
    max_grad_norm: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs the forward under autocast where the device supports it."""
    eval_every: int = 0
    """Evaluate every N steps (0: before and after training only)."""
    eval_batches: int | None = None
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: at the end only)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; the one just written is never deleted."""
    resume: str = "auto"
    """Where ``dist-peft train`` (every launcher) starts: ``auto`` — from the newest checkpoint of ``output.dir``
    whose SHA-256 manifest verifies (newer corrupt or incomplete ones skipped with a warning), fresh when there
    is none, so a restarted job continues by itself; ``never`` — fresh; a folder — that checkpoint. ``--resume``
    overrides it; a ``Trainer`` built in Python starts fresh unless given ``resume=``."""
    seed: int = 0
    """Seed of adapter initialisation and dropout."""
    threads: int | None = None
    """torch intra-op threads (None: leave torch's default)."""
    progress: bool = True
    collective_timeout_s: float = 1800.0
    """Seconds a rank waits in one collective before its process group fails the job: the default group's,
    megatron-core's and DeepSpeed's groups (``parallel/runtime.py``). It must cover the longest time one rank works
    alone while the others wait: a 70B per-rank load, rank 0's checkpoint write, the export writer."""
    step_timeout_s: float | None = None
    """Seconds one training step may run on a rank before its watchdog writes every thread's stack and the last
    collective to ``output.dir/hang-rank{R}.txt`` and ends the process (exit code 124), so the launcher restarts
    the job (``train/guards.py``); None: no watchdog. Set it well above the slowest step and below
    collective_timeout_s: it names the stuck rank long before the process group's timeout fails the job."""
    max_bad_steps: int = 5
    """Steps in a row whose loss or gradient norm is not finite (each skipped on every rank, weights and method
    state untouched: ``train/guards.py``) before the run stops with an error."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "micro_batch_size", "grad_accum", "lr", "max_grad_norm", "keep_checkpoints",
                  "eval_batches", "threads", "collective_timeout_s",
                  "step_timeout_s", "max_bad_steps")
        _positive(self, "warmup_steps", "eval_every", "save_every", "weight_decay", allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {self.betas}")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    dir: str
    """Run folder: metrics.jsonl, checkpoints/, adapter/."""


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed ZeRO data parallelism (``integrations/deepspeed.py``); without this section the plain engine
    runs (gradients summed in one all-reduce, optimizer state on every rank)."""

    zero_stage: int = 2
    """1 partitions the fp32 master weights and Adam moments over the ranks, 2 also the gradients, 3 also the
    parameters, the frozen base weights included (stage 0 is the plain engine: leave the section out)."""
    train_batch_size: int | None = None
    """Examples per optimizer step over all ranks, as DeepSpeed's config has it. When set, a launch whose world
    size W gives micro_batch_size × grad_accum × W ≠ train_batch_size is refused before any collective."""
    param_persistence_threshold: int | None = None
    """ZeRO-3: tensors with fewer elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold; None: DeepSpeed's default, 100000)."""
    max_live_parameters: int | None = None
    """ZeRO-3: gathered elements kept whole at once before the least recent are released (DeepSpeed's
    stage3_max_live_parameters; None: its default, 1e9)."""
    max_reuse_distance: int | None = None
    """ZeRO-3: a gathered tensor needed again within this many elements is kept whole (DeepSpeed's
    stage3_max_reuse_distance; None: its default, 1e9)."""
    prefetch_bucket_size: int | None = None
    """ZeRO-3: elements gathered ahead of use (DeepSpeed's stage3_prefetch_bucket_size; None: its default)."""
    reduce_bucket_size: int | None = None
    """Elements of DeepSpeed's gradient-reduction bucket, allocated whole on every rank (None: its default 5e8,
    capped at the rank's trainable elements)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage: must be 1, 2 or 3, got {self.zero_stage} (stage 0 is the plain engine: "
                             f"leave out the deepspeed section)")
        _positive(self, "train_batch_size", "reduce_bucket_size")
        _positive(self, "param_persistence_threshold", "max_live_parameters", "max_reuse_distance",
                  "prefetch_bucket_size", allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """megatron-core tensor and pipeline parallelism (``integrations/megatron_engine.py``); the ranks left over,
    world / (tensor × pipeline), are data parallel. Without this section the transformers engine runs."""

    tensor: int = 1
    """Tensor-parallel size: every targeted projection is split over this many ranks (Megatron's column / row
    parallel linears); it must divide the attention heads, the key-value heads, the MLP width and the vocab."""
    pipeline: int = 1
    """Pipeline stages: the decoder layers are split evenly over them (it must divide the layer count);
    ``train.grad_accum`` micro-batches go through megatron-core's 1F1B schedule per step."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline stage (megatron's interleaved 1F1B schedule, a smaller pipeline bubble): the
    layers are split into pipeline × virtual_pipeline chunks, stage p holding chunks p, p + pipeline, …; needs
    pipeline > 1 and ``train.grad_accum`` a multiple of pipeline."""

    sequence_parallel: bool = False
    """megatron-core sequence parallelism: outside the tensor-parallel linears (norms, dropout, residuals) the
    activations are split along the sequence over the tensor group; a column-parallel linear all-gathers its
    input and a row-parallel one reduce-scatters its output in place of the all-reduce. Needs tensor > 1."""

    def __post_init__(self) -> None:
        _positive(self, "tensor", "pipeline", "virtual_pipeline")
        if self.virtual_pipeline > 1 and self.pipeline == 1:
            raise ValueError(f"virtual_pipeline: {self.virtual_pipeline} chunks per stage need pipeline > 1")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("sequence_parallel: needs tensor > 1 (it splits the sequence over the tensor group)")


@dataclass(frozen=True, kw_only=True)
class RecomputeConfig:
    """Activation recompute (checkpointing): activations of the chosen layers are dropped after the forward
    and recomputed in the backward. Maps to megatron-core's ``recompute_granularity`` / ``recompute_method`` /
    ``recompute_num_layers`` under a ``parallel`` section, and to per-decoder-layer activation checkpointing on
    the transformers and DeepSpeed engines (which support ``granularity: full`` only)."""

    granularity: Literal["full", "selective"] = "full"
    """full: whole decoder layers are recomputed (only each layer's input is kept); selective: only the
    attention core (softmax and its dropout), megatron-core only."""
    method: Literal["uniform", "block"] = "uniform"
    """full granularity: uniform recomputes every layer in groups of ``num_layers``; block recomputes the first
    ``num_layers`` layers of each pipeline stage and keeps the others' activations."""
    num_layers: int | None = None
    """full granularity: the group size (uniform) or the number of layers per stage (block); None: 1
    (uniform) or every layer (block)."""

    def __post_init__(self) -> None:
        _positive(self, "num_layers")
        if self.granularity == "selective" and self.num_layers is not None:
            raise ValueError("num_layers: applies to granularity full only")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """The profiler during a training run (``dist_peft/profile``): rank 0's phase times, memory and saved-for-
    backward bytes join the metric log every ``every`` steps. ``dist-peft profile`` measures more (every rank,
    collectives, FLOPs, NVML, a trace)."""

    every: int = 10
    """Log the profiled figures (medians of the steps since the last time) every N steps."""
    exact: bool = False
    """Synchronize the device at every phase boundary (host intervals with the waits; slower)."""
    saved_tensors: bool = True
    """Measure the bytes saved for backward (saved-tensor hooks)."""

    def __post_init__(self) -> None:
        _positive(self, "every")


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Where the metric log also goes (besides ``output.dir/metrics.jsonl``), written by rank 0."""

    tensorboard: str | None = None
    """A folder for TensorBoard event files (``torch.utils.tensorboard``)."""
    wandb: str | None = None
    """A Weights & Biases project (needs ``pip install wandb``; ``WANDB_MODE=offline`` runs without a network)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    method: MethodConfig
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    deepspeed: DeepSpeedConfig | None = None
    """Present: the DeepSpeed ZeRO engine; absent: the plain engine."""
    parallel: ParallelConfig | None = None
    """Present: the megatron-core engine (tensor / pipeline parallel); absent: the transformers engine."""
    recompute: RecomputeConfig | None = None
    """Present: activation recompute on whichever engine runs; absent: every activation is kept."""
    profile: ProfileConfig | None = None
    """Present: profiled figures in the training log (``dist_peft/profile``); absent: no instrument in the step."""
    log: LogConfig | None = None
    """Present: the log also goes to TensorBoard and / or Weights & Biases."""

    def __post_init__(self) -> None:
        formats = [t.format for t in self.data.tasks] or [self.data.format]
        if any((self.model.task == "classification") != (f == "classification") for f in formats):
            raise ValueError("data.format: classification data needs model.task classification and vice versa")
        num_tasks = getattr(self.method.options, "num_tasks", None)  # a multitask method (FO-LoRA)
        if num_tasks is not None and num_tasks != (len(self.data.tasks) or 1):
            raise ValueError(f"method.num_tasks: must equal the number of data.tasks ({len(self.data.tasks) or 1}), "
                             f"got {num_tasks}")
        per_rank = self.train.micro_batch_size * self.train.grad_accum
        if self.deepspeed and self.deepspeed.train_batch_size and self.deepspeed.train_batch_size % per_rank:
            raise ValueError(f"deepspeed.train_batch_size: {self.deepspeed.train_batch_size} is not a multiple of "
                             f"train.micro_batch_size × train.grad_accum = {per_rank}")
        if getattr(self.method.options, "fp32_merge", False) and self.deepspeed and self.deepspeed.zero_stage == 3 \
                and self.model.dtype != "float32":
            raise ValueError("method.fp32_merge: under ZeRO-3 its fp32 master is a whole, unpartitioned copy of every "
                             "adapted weight on every rank (4 bytes per element; methods/scalora.py); leave it off, "
                             "or use ZeRO stage 1 or 2")
        if self.recompute is not None and self.recompute.granularity == "selective" and self.parallel is None:
            raise ValueError("recompute.granularity: selective recompute is megatron-core's (a parallel section); "
                             "the transformers and DeepSpeed engines recompute whole layers (full)")
        if self.parallel is not None:
            if self.deepspeed is not None:
                raise ValueError("parallel: the megatron-core engine does not run under DeepSpeed ZeRO; leave out "
                                 "one of the parallel and deepspeed sections")
            p = self.parallel
            if p.virtual_pipeline > 1 and self.train.grad_accum % p.pipeline:
                raise ValueError(f"train.grad_accum: the interleaved schedule (parallel.virtual_pipeline "
                                 f"{p.virtual_pipeline}) runs micro-batches in groups of parallel.pipeline = "
                                 f"{p.pipeline}; got {self.train.grad_accum}, not a multiple")
            if self.model.task != "causal_lm" or self.model.trainable_modules:
                raise ValueError("parallel: the megatron-core engine trains causal-LM adapters only (model.task "
                                 "causal_lm, no model.trainable_modules)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = {"name": self.method.name, "target_modules": list(self.method.target_modules),
                       **dataclasses.asdict(self.method.options)}
        if not self.data.tasks:  # single-task configs keep their pre-multitask dict (checkpoints compare it)
            del d["data"]["tasks"]
        for section in ("deepspeed", "parallel", "recompute", "profile", "log"):  # absent: the earlier dict
            if d[section] is None:
                del d[section]
        if d.get("parallel") and not d["parallel"]["sequence_parallel"]:
            del d["parallel"]["sequence_parallel"]
        for source in (d["data"], *d["data"].get("tasks", ())):  # no order_seed: the earlier dict
            if source["order_seed"] is None:
                del source["order_seed"]
        if d["model"]["preset"] is None:  # configs without a preset keep their earlier dict
            del d["model"]["preset"]
        if d["model"]["tiny"]["head_dim"] is None:
            del d["model"]["tiny"]["head_dim"]
        return _plain(d)


def check_world_size(cfg: RunConfig, world: int) -> None:
    """Refuse a launch of ``world`` ranks that the config's sizes do not fit (a ConfigError naming the key);
    called before any process group or collective exists."""
    mp = cfg.parallel.tensor * cfg.parallel.pipeline if cfg.parallel else 1
    if world % mp:
        raise ConfigError(f"parallel: tensor × pipeline = {mp} ranks per model replica do not divide the {world} "
                          f"ranks of this launch; launch a multiple of {mp} ranks or change the config")
    ds = cfg.deepspeed
    if ds is not None and ds.train_batch_size is not None:
        per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum
        if per_rank * world != ds.train_batch_size:
            raise ConfigError(f"deepspeed.train_batch_size: {ds.train_batch_size} examples per step do not split over "
                              f"{world} ranks of train.micro_batch_size × train.grad_accum = {per_rank} "
                              f"({per_rank} × {world} = {per_rank * world}); launch "
                              f"{ds.train_batch_size // per_rank} ranks or change the config")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (isinstance(value, int) and abs(value) < 2 ** 1000 or isinstance(value, float) and math.isfinite(value)):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is bool and isinstance(value, bool) or tp in (int, str) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; errors name the key's path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where + '.' if where else ''}{key}: unknown key (expected one of {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where or 'config'}: {e}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where + '.' if where else ''}{e}") from None


def _build_method(raw: Any) -> MethodConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"method: expected a mapping, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", "lora")
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a method name, got {name!r}")
    try:
        entry = get_method(name)
    except ValueError as e:
        raise ConfigError(f"method.name: {e}") from None
    common = {k: raw.pop(k) for k in ("target_modules",) if k in raw}
    return build(MethodConfig, {"name": name, **common, "options": build(entry.config_cls, raw, "method")}, "method")


def from_dict(raw: Any) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    method = _build_method(raw.pop("method", {}))
    if "data" in raw:
        raw["data"] = _inherit_task_keys(raw["data"])
    return build(RunConfig, {**raw, "method": method})


def _inherit_task_keys(data: Any) -> Any:
    """Each entry of ``data.tasks`` takes the data section's other keys as defaults."""
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        return data
    shared = {k: v for k, v in data.items() if k != "tasks"}
    return {**data, "tasks": [{**shared, **t} if isinstance(t, dict) else t for t in data["tasks"]]}


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused before it is parsed."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases: a config from elsewhere cannot expand into exponentially many nodes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> Any:
    """A YAML file from elsewhere, or one ConfigError: size bounded before reading, UTF-8, plain YAML (no aliases,
    no tags)."""
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_NoAliasLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def set_dotted(raw: Any, dotted: str, value: Any, what: str = "--set") -> None:
    """``raw[a][b] = value`` for ``dotted`` = ``a.b``, creating missing sections; ConfigError when a parent is not
    a mapping."""
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise ConfigError(f"{what} {dotted}: {'.'.join(parents) or 'the config'} is not a mapping")
    node[last] = value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (``read_yaml``); ``overrides`` maps dotted keys (``train.steps``) to values."""
    raw = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return from_dict(raw)

"""Adapters on the ``nn.Linear`` sites of a transformers model, and adapter files in the HF PEFT layout.

Order of operations (``inject_adapters``): freeze the whole model, then wrap each targeted linear in an
``AdaptedLinear`` that owns a fresh adapter; only the adapters' ``trainable_names`` (and any ``extra_trainable``
modules, such as a new classification head) are left trainable.

Files: ``adapter_model.safetensors`` holds ``base_model.model.<module path>.<file key>`` tensors (the key layout
of HF PEFT, so ``peft.PeftModel.from_pretrained`` loads our LoRA files), ``adapter_config.json`` is PEFT's
config (written only for methods PEFT has), and ``dist_peft_adapter.json`` names our method and its config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from dist_peft.files import BadFileError, atomic_dir, load_tensors, read_json, save_tensors, verify_dir, write_json
from dist_peft.methods.base import Adapter, Site, get_method
from dist_peft.parallel.shard import ShardSpec

CANONICAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEY_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, PEFT_CONFIG, OUR_CONFIG = "adapter_model.safetensors", "adapter_config.json", "dist_peft_adapter.json"
FORMAT_VERSION = 1


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus an adapter: y = base(x) + update (or base(x) alone once merged)."""

    def __init__(self, base_layer: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) if self.merged else self.adapter.forward_site(x, self.base_layer)

    @torch.no_grad()
    def merge(self) -> None:
        """W += ΔW, refusing a non-finite ΔW (the model is left untouched)."""
        if self.merged:
            return
        delta = self.adapter.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"{self.adapter.site.name}: the update is not finite; refusing to merge")
        self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight -= self.adapter.unmerge_delta(weight).to(weight.dtype)
            self.merged = False


def _layer_index(path: str) -> int | None:
    return next((int(p) for p in path.split(".") if p.isdigit()), None)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside: the RNG seeded with ``seed`` (None: left as it is). Outside, every generator this process uses
    (the CPU's and the current CUDA device's) is as it was: ``torch.manual_seed`` seeds the CUDA ones too."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


def site_seed(seed: int, name: str) -> int:
    """Adapter initialisation seed of one site: the run seed and the site name only, so that every engine
    and parallel layout initialises every adapter exactly alike."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def inject_adapters(model: nn.Module, method: str, cfg: Any, target_modules: Iterable[str],
                    extra_trainable: Iterable[str] = (), seed: int | None = None) -> dict[str, AdaptedLinear]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose last name is in ``target_modules``. With ``seed``,
    each adapter is initialised from ``site_seed(seed, path)`` (layout-independent); without, from the
    global RNG in module order (as HF PEFT does). On a ZeRO-3 partitioned model each frozen W is gathered whole
    only while its own adapter is built (one site at a time), and a method's ``prepare`` reads them one layer at
    a time (FRoD: ``hjd_cache.LatentRows``)."""
    entry = get_method(method)
    targets, extra = set(target_modules), set(extra_trainable)
    if adapted_sites(model):
        raise ValueError("the model already holds adapters")
    model.requires_grad_(False)
    found: set[str] = set()
    sites: dict[str, tuple[Site, nn.Linear]] = {}
    for path, module in list(model.named_modules()):
        kind = path.rpartition(".")[2]
        if kind in targets and isinstance(module, nn.Linear):
            sites[path] = Site(path, kind, _layer_index(path), module.out_features, module.in_features,
                               module.weight, module.bias), module
            found.add(kind)
        if kind in extra:
            module.requires_grad_(True)
            found.add(kind)
    from dist_peft.integrations.deepspeed import gathered  # not at the top: that module imports this one

    extra_kwargs = entry.adapter_cls.prepare([site for site, _ in sites.values()], cfg)
    for path, (site, module) in sites.items():
        # A ZeRO-3 partitioned model (models.load_partitioned): W whole for its own adapter's construction only.
        with seeded(None if seed is None else site_seed(seed, path)), gathered([module.weight]):
            adapter = entry.adapter_cls(site, ShardSpec(), cfg, **extra_kwargs.get(path, {}))
        _set_submodule(model, path, AdaptedLinear(module, adapter))
    missing = (targets | extra) - found
    if missing:
        raise ValueError(f"target modules {sorted(missing)} match no nn.Linear / module of the model")
    model.dist_peft_modules_to_save = sorted(extra)  # read back when the adapter files are written
    return adapted_sites(model)


def adapted_sites(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {m.adapter.site.name: m for m in model.modules() if isinstance(m, AdaptedLinear)}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable tensors by model path, in a fixed order (the optimizer's and the checkpoint's)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def enable_recompute(model: nn.Module, recompute: Any) -> None:
    """Activation recompute on the transformers and DeepSpeed engines (the ``recompute`` section): HF's per-decoder-
    layer gradient checkpointing with torch's non-reentrant checkpoint. Non-reentrant, so the frozen embedding needs
    no gradient and the recomputed forward only refills saved tensors: the backward runs once through the original
    graph, and a method's backward hooks (FO-LoRA's refit capture, LoCA's location gradients) fire once per
    micro-batch. ``uniform`` checkpoints every layer (HF's unit is one layer, so ``num_layers`` must be 1);
    ``block`` the first ``num_layers`` decoder layers (None: all)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from dist_peft.train.config import ConfigError

    if recompute.granularity != "full" or (recompute.method == "uniform" and (recompute.num_layers or 1) != 1):
        raise ConfigError(f"recompute: the transformers and DeepSpeed engines recompute single whole layers "
                          f"(granularity full, uniform with num_layers 1, or block); got {recompute}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recompute.method == "block" and recompute.num_layers is not None:
        for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)][recompute.num_layers:]:
            layer.gradient_checkpointing = False


def set_merged(model: nn.Module, merged: bool) -> None:
    for site in adapted_sites(model).values():
        site.merge() if merged else site.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain linears back (for exporting weights)."""
    for path, site in adapted_sites(model).items():
        site.merge()
        _set_submodule(model, path, site.base_layer)
    return model


def _file_state(model: nn.Module) -> dict[str, Tensor]:
    state = {}
    for path, site in adapted_sites(model).items():
        for name in site.adapter.trainable_names + site.adapter.buffer_names:
            state[f"{KEY_PREFIX}{path}.{site.adapter.file_key(name)}"] = getattr(site.adapter, name)
    adapter_params = {id(p) for s in adapted_sites(model).values() for p in s.adapter.parameters()}
    for name, p in trainable_parameters(model).items():
        if id(p) not in adapter_params:
            state[f"{KEY_PREFIX}{name}"] = p
    return state


def _describe(model: nn.Module) -> tuple[Adapter, list[str], list[str]]:
    sites = adapted_sites(model)
    if not sites:
        raise ValueError("the model holds no adapters")
    adapters = [s.adapter for s in sites.values()]
    targets = sorted({a.site.module_type for a in adapters})
    return adapters[0], targets, list(getattr(model, "dist_peft_modules_to_save", []))


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str = "", task_type: str = "CAUSAL_LM") -> Path:
    """Write the model's adapter files atomically (with a checksum manifest) and return the folder."""
    first, targets, extra = _describe(model)
    state = {k[len(KEY_PREFIX):]: v for k, v in _file_state(model).items()}
    return write_adapter_files(out_dir, state, first, targets, extra, base_model, task_type)


def write_adapter_files(out_dir: str | Path, state: dict[str, Tensor], adapter: Adapter, targets: list[str],
                        modules_to_save: list[str], base_model: str = "", task_type: str = "CAUSAL_LM") -> Path:
    """Write full (unsplit) adapter tensors keyed ``<module path>.<file key>``; ``adapter`` is any one
    adapter of the model (its method and config describe them all). Engines with sharded adapters gather
    the full tensors first and call this on one rank."""
    ours = {"format_version": FORMAT_VERSION, "method": adapter.method_name,
            "config": dataclasses.asdict(adapter.cfg), "target_modules": targets,
            "modules_to_save": modules_to_save, "base_model": base_model, "task_type": task_type}
    peft = adapter.peft_config(adapter.cfg, targets)
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, {KEY_PREFIX + k: v for k, v in state.items()})
        write_json(tmp / OUR_CONFIG, ours)
        if peft is not None:
            write_json(tmp / PEFT_CONFIG, {**peft, "base_model_name_or_path": base_model, "task_type": task_type,
                                           "modules_to_save": modules_to_save or None, "inference_mode": True})
    return Path(out_dir)


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """Method, config and targets of an adapter folder (ours, or an HF PEFT LoRA folder). The file may come from
    elsewhere: any key or value this run cannot use is one BadFileError naming the file (the method config is
    built and validated like a run config's method section)."""
    from dist_peft.train.config import build  # train imports this module

    folder = Path(folder)
    path = folder / (OUR_CONFIG if (folder / OUR_CONFIG).is_file() else PEFT_CONFIG)
    meta = read_json(path)
    try:
        if not isinstance(meta, dict):
            raise ValueError("expected a JSON object")
        if path.name == OUR_CONFIG:
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
            method, config = meta.get("method"), build(get_method(str(meta.get("method"))).config_cls,
                                                       meta.get("config"), "config")
        else:
            method, config = "lora", get_method("lora").adapter_cls.config_from_peft(meta)
        lists = {k: meta.get(k) or [] for k in ("target_modules", "modules_to_save")}
        if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists.values()):
            raise ValueError("target_modules and modules_to_save must be lists of module names")
    except (ValueError, KeyError, TypeError) as e:  # ConfigError is a ValueError
        raise BadFileError(f"{path}: {e}") from None
    return {**meta, "method": method, "config": config, **lists}


def load_adapter(model: nn.Module, folder: str | Path) -> dict[str, AdaptedLinear]:
    """Load adapter files into ``model`` (injecting the adapters first if it holds none); every tensor is
    checked for presence, shape and finiteness before anything is copied."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        verify_dir(folder)
    meta = read_adapter_config(folder)
    if not adapted_sites(model):
        inject_adapters(model, meta["method"], meta["config"], meta["target_modules"], meta["modules_to_save"])
    first, _, _ = _describe(model)
    if first.method_name != meta["method"] or first.cfg != meta["config"]:
        raise BadFileError(f"{folder}: adapter is {meta['method']} {meta['config']}, the model holds "
                         f"{first.method_name} {first.cfg}")
    tensors = load_tensors(folder / ADAPTER_WEIGHTS)
    expected = _file_state(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise BadFileError(f"{folder / ADAPTER_WEIGHTS}: keys differ from the model's sites; "
                           f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}")
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise BadFileError(f"{key}: shape {tuple(t.shape)} in file, {tuple(expected[key].shape)} in the model")
        if not torch.isfinite(t).all():
            raise BadFileError(f"{key}: non-finite values in {folder / ADAPTER_WEIGHTS}")
    for path, site in adapted_sites(model).items():  # method-level value checks (e.g. LoCA locations in [0, 1])
        adapter = site.adapter
        try:
            adapter.validate_loaded({n: tensors[f"{KEY_PREFIX}{path}.{adapter.file_key(n)}"]
                                     for n in adapter.trainable_names})
        except ValueError as err:
            raise BadFileError(f"{folder / ADAPTER_WEIGHTS}: {err}") from err
    with torch.no_grad():
        for key, t in tensors.items():
            expected[key].copy_(t)
    return adapted_sites(model)

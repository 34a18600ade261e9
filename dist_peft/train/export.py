"""Export a checkpoint as adapter files (HF PEFT layout) or as a merged Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

from dist_peft.files import atomic_dir, read_json
from dist_peft.integrations.transformers import inject_adapters, merge_and_unload, save_adapter, trainable_parameters
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import from_dict
from dist_peft.train.models import load_model


def export(checkpoint: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Rebuild the checkpoint's model from its own config, load the trained tensors, and write ``out``."""
    if (Path(checkpoint) / ckpt.PARTS).is_file():
        return _export_parts(Path(checkpoint), Path(out), merged)
    c = ckpt.load_checkpoint(checkpoint)
    cfg = from_dict(c.config)
    model, tokenizer = load_model(cfg.model)
    sites = inject_adapters(model, cfg.method.name, cfg.method.options, cfg.method.target_modules,
                            cfg.model.trainable_modules, seed=cfg.train.seed)
    ckpt.restore_params(c, trainable_parameters(model))
    # Method state that is not a trainable tensor (e.g. FO-LoRA's masks) comes back through the controller.
    adapters = {name: s.adapter for name, s in sites.items()}
    next(iter(adapters.values())).controller_cls(adapters).load_state_dict(
        {k[len("method/"):]: v for k, v in c.tensors.items() if k.startswith("method/")})
    if not merged:
        task = "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"
        return save_adapter(model, out, base_model=cfg.model.source, task_type=task)
    merge_and_unload(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def _export_parts(folder: Path, out: Path, merged: bool) -> Path:
    """A megatron-core checkpoint (one part per rank): resumed by the launch's ranks, which must have the layout
    that wrote it (launch the export as the training was launched), and written from there: adapter files
    gathered over TP and PP, or the merged model as a sharded Hugging Face folder (a collective)."""
    from dist_peft.train.loop import Trainer  # the loop builds the megatron engine

    part = read_json(folder / ckpt.PARTS)["parts"][0]
    trainer = Trainer(from_dict(ckpt.load_checkpoint(folder, part).config), resume=folder, echo=lambda m: None)
    if merged:
        return trainer.mg.export_hf(out, trainer.tokenizer, trainer.rt.is_main)
    return trainer.save_adapter(out)

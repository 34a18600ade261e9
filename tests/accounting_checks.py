"""Measure a Trainer's model-state tensors on this rank, for the planner's exact-bytes checks
(tests/test_megatron.py, tests/test_accounting.py): frozen parameters, adapter parameters, the gradients present
at the optimizer step, and the AdamW moments."""

from __future__ import annotations


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def record_state_bytes(trainer) -> dict:
    """Wrap the optimizer's step so that the returned dict gets every byte count at the first step."""
    out: dict = {}
    step = trainer.optimizer.step

    def measured_step(*args, **kwargs):
        if not out:
            modules = trainer.mg.chunks if trainer.mg is not None else [trainer.model]
            params = list(trainer.params.values())
            out.update(frozen=_nbytes(p for m in modules for p in m.parameters() if not p.requires_grad),
                       adapters=_nbytes(params), gradients=_nbytes(p.grad for p in params if p.grad is not None))
        result = step(*args, **kwargs)
        if "optimizer" not in out:
            out["optimizer"] = _nbytes(t for s in trainer.optimizer.state.values() for k, t in s.items()
                                       if k in ("exp_avg", "exp_avg_sq"))
        return result

    trainer.optimizer.step = measured_step
    return out


def planned_state_bytes(cfg, world: int, stage: int) -> dict:
    """The planner's model-state bytes of a rank of pipeline stage ``stage``."""
    from dist_peft.accounting.memory import stage_memory
    from dist_peft.accounting.plan import layout_of, shape_of

    s = stage_memory(shape_of(cfg.model), cfg.method, layout_of(cfg, world))[stage]
    return {"frozen": s.frozen, "adapters": s.adapters, "gradients": s.gradients, "optimizer": s.optimizer}

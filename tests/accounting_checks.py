"""Measure a Trainer's model-state tensors on this rank, for the planner's exact-bytes checks
(tests/test_megatron.py, tests/test_accounting.py): frozen parameters, adapter parameters, the gradients present
at the optimizer step, and the AdamW moments."""

from __future__ import annotations


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def record_state_bytes(trainer) -> dict:
    """Wrap the optimizer's step so that the returned dict holds each byte count's maximum over the run's steps
    (a method may train some tensors only in some steps: LoCA's coefficients and locations alternate)."""
    out: dict = {}
    step = trainer.optimizer.step

    def keep(key: str, value: int) -> None:
        out[key] = max(out.get(key, 0), value)

    def measured_step(*args, **kwargs):
        modules = trainer.mg.chunks if trainer.mg is not None else [trainer.model]
        params = list(trainer.params.values())
        keep("frozen", _nbytes(p for m in modules for p in m.parameters() if not p.requires_grad))
        keep("adapters", _nbytes(params))
        keep("gradients", _nbytes(p.grad for p in params if p.grad is not None))
        result = step(*args, **kwargs)
        keep("optimizer", _nbytes(t for s in trainer.optimizer.state.values() for k, t in s.items()
                                  if k in ("exp_avg", "exp_avg_sq")))
        return result

    trainer.optimizer.step = measured_step
    return out


def planned_state_bytes(cfg, world: int, stage: int) -> dict:
    """The planner's model-state bytes of a rank of pipeline stage ``stage``."""
    from dist_peft.accounting.memory import stage_memory
    from dist_peft.accounting.plan import layout_of, shape_of

    s = stage_memory(shape_of(cfg.model), cfg.method, layout_of(cfg, world))[stage]
    return {"frozen": s.frozen, "adapters": s.adapters, "gradients": s.gradients, "optimizer": s.optimizer}

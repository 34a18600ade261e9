"""Measure a Trainer's model-state tensors on this rank, for the planner's exact-bytes checks
(tests/test_megatron.py, tests/test_deepspeed.py): frozen parameters, adapter parameters, the gradients present
at the optimizer step, and the AdamW moments (with DeepSpeed's fp32 master partitions under ZeRO)."""

from __future__ import annotations

import torch

ZERO_GRADS = ("averaged_gradients", "all_grad_tensors", "grads_in_partition", "ipg_buffer",
              "grad_partitions_flat_buffer")
"""DeepSpeed 0.19 ZeRO optimizer attributes that hold gradients (partitions, reduction buckets)."""
ZERO_MASTERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
"""Its fp32 master partitions (ZeRO-1/2, ZeRO-3)."""


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(obj):
    """Every tensor in ``obj`` (a tensor, or lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _storage_bytes(tensors, leave_out=()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count it once, padding
    included; meta and empty tensors count nothing), but for the storages of ``leave_out``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta" and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in leave_out:
        seen.pop(t.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def _zero_grad_bytes(zero, params) -> int:
    """Gradient bytes DeepSpeed holds on this rank, its reduction bucket left out (``_zero_bucket``, planned on its
    own); the ``.grad`` of a tensor copied into the bucket is a view of it."""
    grads = [p.grad for p in params] + [t for name in ZERO_GRADS for t in _tensors(getattr(zero, name, None))] \
        + [flat.grad for name in ZERO_MASTERS for flat in getattr(zero, name, None) or []]
    return _storage_bytes(grads, _zero_bucket(zero))


def _zero_bucket(zero) -> list:
    """DeepSpeed's gradient-reduction bucket (``reduce_bucket_size`` elements, allocated whole)."""
    return list(_tensors([b.buffer for b in getattr(zero, "ipg_buckets", {}).values()]))  # 1/2: a list; 3: one


def record_state_bytes(trainer) -> dict:
    """Wrap the optimizer's step so that the returned dict holds each byte count's maximum over the run's steps
    (a method may train some tensors only in some steps: LoCA's coefficients and locations alternate).

    Under DeepSpeed ZeRO the counts are the distinct storages the engine holds on this rank: frozen weights (their
    ZeRO-3 partitions ``ds_tensor`` and any gathered value), the adapters (the padded flat buffer their ZeRO-1/2
    values are views of, their ZeRO-3 partitions), the gradients (the model's ``.grad``, DeepSpeed's partitions,
    the fp32 flat gradient of the step, not its reduction bucket, which ``bucket`` holds once autograd is done;
    also measured at the end of each micro-batch's backward before DeepSpeed reduces: ZeRO-1's whole gradients at
    the last, and after each backward but the last), and the optimizer (DeepSpeed's fp32 master partitions and the AdamW moments of the partitions)."""
    out: dict = {}
    step = trainer.optimizer.step
    ds = getattr(trainer, "ds", None)

    def keep(key: str, value: int) -> None:
        out[key] = max(out.get(key, 0), value)

    def moments():
        return [t for s in trainer.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]

    def measured_step(*args, **kwargs):
        params = list(trainer.params.values())
        if ds is None:
            modules = trainer.mg.chunks if trainer.mg is not None else [trainer.model]
            keep("frozen", _nbytes(p for m in modules for p in m.parameters() if not p.requires_grad))
            keep("adapters", _nbytes(params))
            keep("gradients", _nbytes(p.grad for p in params if p.grad is not None))
            result = step(*args, **kwargs)
            keep("optimizer", _nbytes(moments()))
            return result
        zero = ds.engine.optimizer
        frozen = [p for p in ds.module.parameters() if not p.requires_grad]
        keep("frozen", _storage_bytes([p.data for p in frozen] + [getattr(p, "ds_tensor", None) for p in frozen]))
        keep("adapters", _storage_bytes([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]))
        keep("gradients", _zero_grad_bytes(zero, params))
        result = step(*args, **kwargs)
        keep("optimizer", _storage_bytes(moments() + [t for name in ZERO_MASTERS
                                                      for t in getattr(zero, name, None) or []]))
        return result

    trainer.optimizer.step = measured_step
    if ds is not None:
        backward, reduce = ds.backward, ds.engine.allreduce_gradients

        def measured_backward(loss, last):
            backward(loss, last)
            if not last:
                keep("gradients", _zero_grad_bytes(ds.engine.optimizer, list(trainer.params.values())))

        def measured_reduce(*args, **kwargs):  # the engine's backward calls it once autograd is done
            keep("gradients", _zero_grad_bytes(ds.engine.optimizer, list(trainer.params.values())))
            keep("bucket", _storage_bytes(_zero_bucket(ds.engine.optimizer)))
            return reduce(*args, **kwargs)

        ds.backward, ds.engine.allreduce_gradients = measured_backward, measured_reduce
    return out


def planned_state_bytes(cfg, world: int, stage: int) -> dict:
    """The planner's model-state bytes of a rank of pipeline stage ``stage`` (under ZeRO also DeepSpeed's reduction
    bucket, which its ``buffers`` hold beside the method's)."""
    from dist_peft.accounting.memory import stage_memory
    from dist_peft.accounting.plan import layout_of, shape_of

    layout = layout_of(cfg, world)
    s = stage_memory(shape_of(cfg.model), cfg.method, layout)[stage]
    bucket = {"bucket": s.bucket} if layout.zero else {}
    return {"frozen": s.frozen, "adapters": s.adapters, "gradients": s.gradients, "optimizer": s.optimizer, **bucket}


def record_saved_bytes(engine) -> dict:
    """Wrap the megatron engine's ``forward_backward`` in a ``SavedTensorMeter`` (parameters and buffers excluded:
    model state, planned as weights and method buffers, e.g. FRoD's bases that its kernels save): the
    returned dict's ``peak`` is the most bytes saved for backward alive at once on this rank over the run's steps
    (1F1B's micro-batches in flight, a recomputed layer's set, the loss's saved tensors on the last stage)."""
    from dist_peft.profile.memory import SavedTensorMeter

    meter = SavedTensorMeter([t for chunk in engine.chunks for t in (*chunk.parameters(), *chunk.buffers())])
    out = {"peak": 0}
    step = engine.forward_backward

    def measured(*args, **kwargs):
        with meter.measuring():
            result = step(*args, **kwargs)
        out["peak"] = meter.peak
        return result

    engine.forward_backward = measured
    return out


def planned_saved_bytes(cfg, world: int, stage: int) -> float:
    """The planner's bytes saved for backward on a rank of pipeline stage ``stage`` at the schedule's peak: its
    activations and, on the last stage, the fp32 log-softmax the loss saves."""
    from dist_peft.accounting.memory import activation_bytes, logits_saved_bytes
    from dist_peft.accounting.plan import layout_of, shape_of

    shape, layout = shape_of(cfg.model), layout_of(cfg, world)
    head = logits_saved_bytes(shape, layout) if stage == layout.pp - 1 else 0
    return activation_bytes(shape, cfg.method, layout, stage, shape.layers // layout.pp, head) + head

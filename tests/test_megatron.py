"""megatron-core engine on 4 gloo processes: TP=2×PP=2, TP=2×DP=2 and PP=2×DP=2 in one launch, each
against the single-process transformers engine on the same tiny Llama and data.

Launch: pytest tests/test_megatron.py (spawns 4 local processes; the megatron CPU shim is applied inside)."""

import torch

from conftest import tiny_config
from distributed import run_dist
from dist_peft.integrations.transformers import adapted_sites, load_adapter, write_adapter_files
from dist_peft.train.data import BatchOrder, build_datasets, collate
from dist_peft.train.loop import Trainer, lr_at
from dist_peft.train.models import build_tiny_llama, byte_tokenizer

LAYOUTS = [(2, 2), (2, 1), (1, 2)]  # (tensor, pipeline); data parallel = 4 / (tensor · pipeline)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN = {"steps": 3, "micro_batch_size": 4, "grad_accum": 2}


def _config(run_dir):
    return tiny_config(run_dir, method={"target_modules": TARGETS}, train=TRAIN)


def _layout_run(hf_dir: str, run_dir: str, tp: int, pp: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from dist_peft.integrations import megatron_cpu
    from dist_peft.integrations.megatron_engine import MegatronEngine, to_megatron_batch
    from dist_peft.parallel import collectives

    megatron_cpu.apply()
    ps.initialize_model_parallel(tp, pp, distributed_timeout_minutes=1)
    model_parallel_cuda_manual_seed(0)
    cfg = _config(run_dir)
    t = cfg.train
    engine = MegatronEngine(hf_dir, "lora", cfg.method.options, TARGETS, seed=t.seed, lr=t.lr)
    tok = byte_tokenizer()
    train, evl = build_datasets(cfg.data, tok, cfg.model.tiny.vocab_size)
    order, dp, dp_rank = BatchOrder(len(train), cfg.data.seed), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def batch(examples):
        b = collate(examples, tok.pad_token_id)
        return to_megatron_batch(b["input_ids"], b["labels"], cfg.data.seq_len, tok.pad_token_id)

    probe = batch([evl[i] for i in range(2)])
    base_logits = engine.logits(probe)
    losses, traces = [], []
    for step in range(t.steps):
        batches = [batch(order.micro_batch(train, step * t.grad_accum + i, t.micro_batch_size // dp, dp_rank, dp))
                   for i in range(t.grad_accum)]
        collectives.TRACE.reset()
        losses.append(engine.train_step(batches, lr_at(step, t), t.max_grad_norm))
        traces.append(collectives.TRACE.reset())
    state = engine.full_adapter_state()
    adapter_dir = f"{run_dir}/adapter-tp{tp}-pp{pp}"
    if torch.distributed.get_rank() == 0:
        first = next(iter(engine.sites.values())).adapter
        write_adapter_files(adapter_dir, state, first, TARGETS, [], base_model="tiny-llama")
    torch.distributed.barrier()
    trained_logits = engine.logits(probe)
    ps.destroy_model_parallel()
    last = trained_logits is not None
    return {"losses": losses, "trace": traces[-1], "state": {k: v.numpy() for k, v in state.items()},
            "base_logits": base_logits.numpy() if last else None, "logits": trained_logits.numpy() if last else None,
            "probe": probe["tokens"].numpy(), "adapter_dir": adapter_dir}


def _all_layouts(hf_dir: str, run_dir: str) -> dict:
    return {layout: _layout_run(hf_dir, run_dir, *layout) for layout in LAYOUTS}


def test_megatron_layouts_match_the_single_process_engine(tmp_path):
    """TP2×PP2, TP2×DP2, PP2×DP2: base logits equal HF's; 3 LoRA steps (2 micro-batches each) give the losses
    and adapter weights of the transformers engine; saved adapter files load there with the same logits; and
    a step's collectives are the frozen model's per-token ones, one coalesced gradient reduction per group
    and three scalars."""
    cfg = _config(tmp_path / "ref")
    build_tiny_llama(cfg.model.tiny).save_pretrained(tmp_path / "hf")
    results = run_dist(_all_layouts, 4, hf_dir=str(tmp_path / "hf"), run_dir=str(tmp_path))
    ref = Trainer(cfg, echo=lambda m: None)
    ref.run()
    ref_losses = [r["loss"] for r in ref.history if "loss" in r]
    ref_state = {f"{name}.{s.adapter.file_key(p)}": getattr(s.adapter, p).detach()
                 for name, s in adapted_sites(ref.model).items() for p in s.adapter.trainable_names}
    hf = build_tiny_llama(cfg.model.tiny)
    for layout in LAYOUTS:
        ranks = [results[r][layout] for r in range(4)]
        probe = torch.from_numpy(ranks[0]["probe"])
        with torch.no_grad():
            hf_logits = hf(input_ids=probe).logits
        last = next(r for r in ranks if r["logits"] is not None)
        torch.testing.assert_close(torch.from_numpy(last["base_logits"]), hf_logits, rtol=1e-4, atol=1e-4)
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=0,
                                       msg=f"losses of layout {layout}")
            for key, value in ref_state.items():
                torch.testing.assert_close(torch.from_numpy(r["state"][key]), value, rtol=1e-3, atol=1e-5,
                                           msg=f"{key} under layout {layout}")
        single = build_tiny_llama(cfg.model.tiny)
        load_adapter(single, ranks[0]["adapter_dir"])
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(last["logits"]), single(input_ids=probe).logits,
                                       rtol=1e-4, atol=1e-4)
            assert (single(input_ids=probe).logits - hf_logits).abs().max() > 1e-3
        tp, pp = layout
        dp, mp, layers = 4 // (tp * pp), tp * pp, 2 // pp
        # Per-token, rank 0 (first stage): each layer's two row sites reduce in forward, its two column sites
        # all-reduce dgrad in backward, except layer 0's qkv whose input (frozen embedding) needs no gradient.
        per_token = TRAIN["grad_accum"] * (2 * layers + 2 * layers - 1) if tp > 1 else 0
        per_step = ((tp > 1) + (dp > 1)  # coalesced adapter grads: TP partial sums, then DP
                    + (dp > 1)  # loss targets of the step
                    + 2 * (mp > 1) + (dp > 1))  # grad norm over model parallel; logged loss over mp and dp
        assert ranks[0]["trace"]["calls"].get("all_reduce", 0) == per_token + per_step, (layout, ranks[0]["trace"])
        assert set(ranks[0]["trace"]["calls"]) <= {"all_reduce"}, ranks[0]["trace"]

"""Accounting (dist_peft/accounting) against independent counts: transformers' own models built on the meta
device, the real adapters' tensors, and megatron-core's layers built through the engine's own import path."""

from __future__ import annotations

import json

import pytest
import torch

from dist_peft.accounting import ModelShape, executed_flops, flop_breakdown, model_flops, param_counts
from dist_peft.accounting.presets import check_folder, load_preset, preset_names
from dist_peft.methods.base import SiteShape, get_method
from dist_peft.methods.frod import FrodAdapter
from dist_peft.methods.base import Site
from dist_peft.parallel.shard import ShardKind, ShardSpec

METHODS = ("lora", "loca", "folora", "frod", "odlora", "scalora")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_meta_model(fields: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_presets_cover_the_issue_models():
    """Every model of issue 12 has a preset, and Mistral-Nemo's head_dim differs from hidden / heads."""
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b", "mistral-nemo-base-2407", "qwen2.5-14b",
            "qwen2.5-32b", "qwen2.5-72b"} <= set(preset_names())
    nemo = ModelShape.from_hf(load_preset("mistral-nemo-base-2407"))
    assert nemo.head_dim == 128 and nemo.heads * nemo.head_dim == 4096 != nemo.hidden


@pytest.mark.parametrize("name", preset_names())
def test_preset_param_count_equals_transformers_meta_model(name):
    """The parameter count from the shape formulas equals transformers' model of the preset (exact integers),
    and so does every projection's (m, n) and the bias layout (Qwen2's q/k/v biases)."""
    fields = load_preset(name)
    shape = ModelShape.from_hf(fields)
    model = _hf_meta_model(fields)
    assert shape.param_count() == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    for module_type, (m, n) in shape.site_dims().items():
        linear = getattr(layer.self_attn if module_type in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp,
                         module_type)
        assert tuple(linear.weight.shape) == (m, n), module_type
        assert (linear.bias is not None) == (shape.qkv_bias if module_type in ("q_proj", "k_proj", "v_proj")
                                             else False), module_type


def test_bias_and_tied_variants_match_transformers():
    """Llama's attention_bias (q/k/v/o) and mlp_bias, and tied embeddings, counted as transformers builds them."""
    small = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    for extra in ({"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True},
                  {"model_type": "qwen2", "tie_word_embeddings": True}, {"model_type": "mistral", "head_dim": 8}):
        fields = {**small, **extra}
        assert ModelShape.from_hf(fields).param_count() == sum(
            p.numel() for p in _hf_meta_model(fields).parameters()), extra


def test_preset_folder_check_names_the_differing_field(tmp_path):
    """A weights folder whose config.json matches passes; one layer more is refused naming the field."""
    fields = load_preset("llama-3.1-70b")
    (tmp_path / "config.json").write_text(json.dumps({**fields, "max_position_embeddings": 8192}))
    check_folder("llama-3.1-70b", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**fields, "num_hidden_layers": 81}))
    with pytest.raises(ValueError, match="layers: preset 80, folder 81"):
        check_folder("llama-3.1-70b", tmp_path)


def test_model_flops_is_megatrons_formula_term_by_term():
    """Megatron's expansion-factor form (12·B·s·L·h²·(...)) for SwiGLU + GQA, written independently."""
    s = ModelShape.from_hf(load_preset("mistral-nemo-base-2407"))
    b, seq = 3, 4096
    h, L, n, g, d, f, V = s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab
    q_ratio = n * d / h
    expected = 12 * b * seq * L * h * h * ((1 + g / n + seq / h / 2) * q_ratio + 1.5 * f / h + V / (2 * L * h))
    assert model_flops(s, b * seq, seq) == pytest.approx(expected, rel=1e-12)


def test_executed_flops_is_4n_frozen_plus_adapter_and_attention():
    """LoRA on every projection: 4·N_matmul·T + 6·N_lora·T + attention, and recompute adds one forward."""
    from types import SimpleNamespace

    from dist_peft.methods.frod import FrodConfig
    from dist_peft.methods.lora import LoraConfig

    s = ModelShape.from_hf(load_preset("llama-3.1-70b"))
    method = SimpleNamespace(name="lora", options=LoraConfig(r=16), target_modules=tuple(ALL))
    T, seq = 8192, 4096
    counts = param_counts(s, method)
    assert counts.total == 70_553_706_496 and counts.trainable == 207_093_760
    attn = 6 * T * seq * s.heads * s.head_dim * s.layers
    assert executed_flops(s, T, seq, method) == 4 * s.matmul_params() * T + 6 * counts.trainable * T + attn
    full = flop_breakdown(s, T, seq, method, SimpleNamespace(granularity="full", method="uniform", num_layers=1))
    layer_fwd = 2 * T * (s.matmul_params() - s.vocab * s.hidden)
    assert full.recompute == layer_fwd + attn // 3 + 2 * counts.trainable * T

    # Under TP each rank repeats its replicated share of the adapter work: LoRA's A on a column split (x A is
    # computed whole on every rank), FRoD's d x d latent transform (d is the whole input or output width).
    tp = 8
    lora_tp = flop_breakdown(s, T, seq, method, tensor=tp)
    col = sum(s.site_dims()[t][1] for t in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    row = sum(s.site_dims()[t][0] for t in ("o_proj", "down_proj"))
    replicated = 16 * (col + row) * s.layers  # r · (the unsplit side) per layer, on every rank
    assert lora_tp.adapter_forward == full.adapter_forward + 2 * T * replicated * (tp - 1)
    frod = SimpleNamespace(name="frod", options=FrodConfig(path="transform"), target_modules=("q_proj",))
    assert (flop_breakdown(s, T, seq, frod, tensor=tp).adapter_forward
            == tp * flop_breakdown(s, T, seq, frod).adapter_forward == tp * 4 * s.hidden ** 2 * T * s.layers
            + tp * 2 * T * s.layers * (s.hidden + int(0.01 * s.hidden ** 2)))
    # Per forward, then multiplied: FRoD's merged build is paid by every micro-batch of every replica; one call over
    # the step's tokens would pay it once (and pick the path for a token count no forward sees).
    from dist_peft.accounting.memory import Layout
    from dist_peft.accounting.plan import make_plan
    from dist_peft.accounting.roofline import GPUS

    merged = SimpleNamespace(name="frod", options=FrodConfig(path="merged"), target_modules=("q_proj",))
    layout = Layout(tp=tp, dp=2, grad_accum=4, micro_batch=1, seq_len=seq)
    one = flop_breakdown(s, seq, seq, merged, tensor=tp)
    plan = make_plan(s, merged, layout, GPUS["h100-80gb"])
    assert plan.executed_flops == 8 * one.total
    assert plan.executed_flops > executed_flops(s, 8 * seq, seq, merged, tensor=tp)


def _site(module_type, m, n, spec):
    w = torch.randn(m, n)
    local = spec.shard(w, spec.weight_dim) if spec.weight_dim is not None else w
    return Site(f"layers.0.{module_type}", module_type, 0, m, n, local)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,module_type", [("replicated", "q_proj"), ("column", "gate_proj"), ("row", "o_proj"),
                                              ("row", "down_proj")])
def test_declared_numel_and_buffers_equal_the_adapters_tensors(method, kind, module_type):
    """Each method's trainable_numel and per-site buffer_bytes equal the tensors its adapter builds on a shard
    of a 24 x 16 (or 16 x 24) site under a 2-way split (FRoD's shared basis: the FrodBasis tensors)."""
    entry = get_method(method)
    cfg = entry.config_cls(**({"n_frequency": 20} if method == "loca" else {}))
    m, n = (16, 24) if module_type in ("o_proj", "down_proj") else (24, 16)
    spec = ShardSpec() if kind == "replicated" else ShardSpec(kind, 1, 2)
    site = _site(module_type, m, n, spec)
    kwargs = {}
    if method == "frod":  # the basis is replicated: prepare on the whole weights of 2 layers (as test_frod does)
        whole = [Site(f"layers.{i}.{module_type}", module_type, i, m, n, torch.randn(m, n)) for i in range(2)]
        kwargs = FrodAdapter.prepare(whole, cfg)[whole[0].name]
    adapter = entry.adapter_cls(site, spec, cfg, **kwargs)
    shape = SiteShape(module_type, m, n, spec.kind, spec.size, 2, 4)
    assert entry.adapter_cls.trainable_numel(shape, cfg) == sum(getattr(adapter, t).numel()
                                                                for t in adapter.trainable_names)
    groups: dict[tuple, int] = {}  # the optimizer's groups, as train/loop.build_optimizer makes them
    for t in adapter.trainable_names:
        key = tuple(sorted(adapter.optimizer_overrides().get(t, {}).items()))
        groups[key] = groups.get(key, 0) + getattr(adapter, t).numel()
    assert entry.adapter_cls.group_numels(shape, cfg) == tuple(groups.values())
    own, shared = entry.adapter_cls.buffer_bytes(shape, cfg)
    basis = getattr(adapter, "basis", None)
    basis_bytes = sum(b.nbytes for b in basis.buffers()) if basis is not None else 0
    own_bytes = sum(b.nbytes for name, b in adapter.named_buffers() if not name.startswith("basis."))
    if method != "scalora":  # ScaLoRA's declared bytes are the merge log's peak, built during training
        assert (own, shared) == (own_bytes, basis_bytes)


def _saved_bytes(model, ids, layers=()) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded), and of
    the hidden-state inputs of ``layers`` (what a checkpointed layer keeps for its recompute)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    def keep_input(module, args, kwargs):
        pack((args or [kwargs["hidden_states"]])[0])

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids)
    for h in hooks:
        h.remove()
    return sum(seen.values())


def _random_bf16_model(fields: dict):
    """transformers' model of ``fields`` in bf16, built on the meta device and filled with constants (cheap at 70B
    widths; the values do not change which tensors autograd saves)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01 if p.dim() > 1 else 1.0)
    model.model.rotary_emb.__init__(model.config)  # its inv_freq buffer was left empty by to_empty
    return model


TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("fields,targets,seq,name", [
    (TINY, ALL, 64, "lora"),
    (TINY, ["q_proj", "v_proj"], 64, "lora"),
    (TINY, ["q_proj", "down_proj"], 64, "folora"),
    ({**load_preset("llama-3.1-70b"), "num_hidden_layers": 1, "vocab_size": 512}, ALL, 32, "lora"),
    ({**load_preset("mistral-nemo-base-2407"), "num_hidden_layers": 2, "vocab_size": 512},
     ["q_proj", "v_proj", "down_proj"], 32, "lora"),
], ids=["tiny-all", "tiny-qv", "tiny-folora-mixed-tasks", "llama70b-width-1layer", "nemo-width-2layers"])
def test_activation_bytes_match_saved_tensors(fields, targets, seq, name):
    """The planned activations of one micro-batch (bf16 weights, fp32 LoRA r=16 adapters, bf16 autocast, the
    transformers engine) are within 10% of the bytes autograd saves, measured with saved-tensor hooks; real
    widths with the depth cut and the vocab cut to 512 (the logits are their own term). FO-LoRA (r=16, two tasks,
    a micro-batch of one sample of each) within 1%: its per-sample V_t and its one cast weight, U (measured −0.2%;
    −1.8% when neither was modelled)."""
    from types import SimpleNamespace

    from dist_peft.accounting.memory import Layout, activation_bytes, logits_saved_bytes
    from dist_peft.integrations.transformers import inject_adapters
    from dist_peft.methods.folora import FoloraConfig
    from dist_peft.methods.lora import LoraConfig

    shape = ModelShape.from_hf(fields)
    options = LoraConfig(r=16, lora_alpha=32) if name == "lora" else FoloraConfig(r=16, num_tasks=2)
    method = SimpleNamespace(name=name, options=options, target_modules=tuple(targets))
    model = _random_bf16_model(fields)
    batch = 2
    sites = inject_adapters(model, name, options, targets)
    if name == "folora":  # one sample of each task, as the controller's on_batch hands them out
        for site in sites.values():
            site.adapter.task_ids = torch.arange(batch) % 2
    model.train()
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids)
    layout = Layout(micro_batch=batch, seq_len=seq, weight_bytes=2, act_bytes=2)
    planned = activation_bytes(shape, method, layout, 0, shape.layers) + logits_saved_bytes(shape, layout)
    print(f"planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
          f"error {planned / measured - 1:+.1%}")
    assert abs(planned - measured) <= (0.01 if name == "folora" else 0.10) * measured, (planned, measured)


@pytest.mark.parametrize("fields,targets,seq", [
    ({**TINY, "num_hidden_layers": 4}, ALL, 64),
    ({**load_preset("llama-3.1-70b"), "num_hidden_layers": 2, "vocab_size": 512}, ALL, 32),
    ({**load_preset("mistral-nemo-base-2407"), "num_hidden_layers": 3, "vocab_size": 512}, ["q_proj", "v_proj"], 32),
], ids=["tiny-4layers", "llama70b-width-2layers", "nemo-width-3layers"])
def test_activation_bytes_under_full_recompute_match_saved_tensors(fields, targets, seq):
    """Full recompute (``recompute: {granularity: full}``, the transformers engine's per-layer non-reentrant
    checkpoint, ``enable_recompute``): the planned activations are within 10% of the bytes held at the backward's
    peak, measured as the run holds them: every layer's hidden-state input (kept by its checkpoint), the tensors
    saved outside the layers (final norm, head, loss: saved-tensor hooks) and one layer's recomputed set (the
    last layer left uncheckpointed, ``method: block``, so the hooks see what its recompute saves)."""
    from types import SimpleNamespace

    from dist_peft.accounting.memory import Layout, activation_bytes, logits_saved_bytes
    from dist_peft.integrations.transformers import enable_recompute, inject_adapters
    from dist_peft.methods.lora import LoraConfig

    shape = ModelShape.from_hf(fields)
    method = SimpleNamespace(name="lora", options=LoraConfig(r=16, lora_alpha=32), target_modules=tuple(targets))
    model = _random_bf16_model(fields)
    inject_adapters(model, "lora", method.options, targets)
    enable_recompute(model, SimpleNamespace(granularity="full", method="block", num_layers=shape.layers - 1))
    model.train()
    batch = 2
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids, model.model.layers)
    layout = Layout(micro_batch=batch, seq_len=seq, weight_bytes=2, act_bytes=2, recompute="full")
    planned = activation_bytes(shape, method, layout, 0, shape.layers) + logits_saved_bytes(shape, layout)
    print(f"planned {planned / 2**20:.3f} MiB, measured {measured / 2**20:.3f} MiB, "
          f"error {planned / measured - 1:+.1%}")
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


@pytest.mark.parametrize("name", preset_names())
def test_megatron_layer_shapes_per_tp_rank_follow_from_the_import_config(name):
    """The per-rank sites of ``target_sites`` under TP8 (TP4 for 40-head Qwen) have the local sizes megatron-core
    gives its parallel linears, from the TransformerConfig the engine builds (integrations/megatron.py): linear_qkv
    out kv_channels·(heads + 2·groups)/TP, linear_proj in kv_channels·heads/TP, fc1 out 2·ffn/TP, fc2 in ffn/TP."""
    from transformers import AutoConfig

    from dist_peft.accounting import target_sites
    from dist_peft.integrations.megatron import transformer_config

    fields = load_preset(name)
    shape = ModelShape.from_hf(fields)
    tp = 8 if shape.heads % 8 == 0 else 4
    tc = transformer_config(AutoConfig.for_model(**fields), tp, 1, torch.bfloat16)
    local = {s.module_type: (s.m_local, s.n_local) for s in target_sites(shape, ALL, tp)}
    assert local["q_proj"][0] + local["k_proj"][0] + local["v_proj"][0] == \
        tc.kv_channels * (tc.num_attention_heads + 2 * tc.num_query_groups) // tp
    assert local["o_proj"] == (tc.hidden_size, tc.kv_channels * tc.num_attention_heads // tp)
    assert local["gate_proj"][0] + local["up_proj"][0] == 2 * tc.ffn_hidden_size // tp
    assert local["down_proj"] == (tc.hidden_size, tc.ffn_hidden_size // tp)
    assert tc.add_qkv_bias == shape.qkv_bias

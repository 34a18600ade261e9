"""The throughput profiler (``dist_peft/profile``): phase times that add up to the step, FLOPs from hand counts,
NVML matched by PCI bus id (and its absence reported), a trace with phase ranges, TensorBoard events read back.

Launch: pytest tests/test_profile.py (single process; the distributed checks spawn one 4-process megatron
TP2×PP2 launch and one 2-process ZeRO-2 launch)."""

from __future__ import annotations

import gzip
import json
import statistics
import types

import pytest
import torch

from conftest import tiny_config
from distributed import run_dist
from dist_peft.accounting import ModelShape, model_flops
from dist_peft.methods.base import SiteShape, get_method
from dist_peft.accounting.comms import bus_factor
from dist_peft.profile.flops import device_peak
from dist_peft.profile.nvml import NvmlSampler
from dist_peft.profile.run import profile
from dist_peft.profile.session import Settings
from dist_peft.profile.timer import UNACCOUNTED, PhaseTimer

TRAIN = {"steps": 4, "micro_batch_size": 4, "grad_accum": 2, "threads": 1}


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """One traced single-process profile of LoRA (q, v, down; r 4) on the tiny Llama: its profile.json."""
    root = tmp_path_factory.mktemp("profile")
    cfg = tiny_config(root / "run", train=TRAIN)
    profile([("lora", cfg)], Settings(steps=4, warmup=1, trace=True, nvml_interval_s=0.05), root / "out",
            frozen=False, echo=lambda _m: None)
    return root / "out", json.loads((root / "out" / "profile.json").read_text())


def test_phases_add_up_to_the_step_time(tiny_profile):
    """Each step's exclusive phase times add up to its measured time, and time outside every phase (the
    unaccounted remainder) is under 5% of the step (median over steps: one step on a loaded machine may be
    preempted between two phases)."""
    _, doc = tiny_profile
    assert doc["schema"] == "dist-peft-profile/1"
    (run,) = doc["configs"]
    assert {"data", "forward", "backward", "grad_reduce", "optimizer", "log"} <= set(run["phases"])
    assert run["phases"][UNACCOUNTED]["share"] < 0.05
    for step in run["rank_steps"]["0"]:
        assert sum(step["phases"].values()) == pytest.approx(step["time_s"], rel=1e-9)


def test_phase_timer_is_exclusive_for_nested_ranges():
    """A phase opened inside another takes its time out of the outer one; spans outside every phase are
    unaccounted; the sum is the step."""
    import time

    timer = PhaseTimer("cpu")
    with timer.step(0):
        with timer.phase("outer"):
            time.sleep(0.01)
            with timer.phase("inner"):
                time.sleep(0.1)
        time.sleep(0.01)
    (s,) = timer.collect()
    assert s.phases["inner"] >= 0.1 and 0.01 <= s.phases["outer"] < 0.1  # inner counted in outer: >= 0.11
    assert s.phases[UNACCOUNTED] >= 0.01
    assert sum(s.phases.values()) == pytest.approx(s.time_s, rel=1e-9)


def test_model_flops_equal_a_hand_count_for_the_tiny_config(tiny_profile):
    """Tiny Llama (h 64, f 128, L 2, 4 heads of 16, 2 KV groups, V 260, s 16): per token 6·[3hfL + (h(nd+2gd) +
    ndh)L + hV] + 6sndL = 6·(49152 + 24576 + 16640) + 6·16·64·2 = 554496; the report's model FLOPs are that
    times the step's tokens (4 × 2 micro-batches × 16)."""
    _, doc = tiny_profile
    flops = doc["configs"][0]["flops"]
    tokens = doc["configs"][0]["throughput"]["tokens_per_step"]
    assert tokens == 4 * 2 * 16
    assert flops["model"] == 554496 * tokens
    assert flops["mfu"] is None and "CPU" in flops["mfu_omitted"]


def test_model_flops_equal_megatrons_for_llama_3_1_70b():
    """Llama-3.1-70B (h 8192, f 28672, L 80, 64 heads of 128, 8 KV groups, V 128256), one 4096-token sequence:
    per token 6·[3·8192·28672·80 + (8192·(8192 + 2·1024) + 8192·8192)·80 + 8192·128256] + 6·4096·8192·80
    = 6·69 501 714 432 + 16 106 127 360 = 433 116 413 952, as Megatron-LM's num_floating_point_operations
    counts a SwiGLU GQA model (causal ½ and the two attention products cancel); × 4096 tokens."""
    shape = ModelShape(model_type="llama", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8,
                       head_dim=128, vocab=128256)
    assert model_flops(shape, 4096, 4096) == 1_774_044_831_547_392


def test_executed_flops_are_the_frozen_floor_plus_the_methods_declared_count(tiny_profile):
    """Executed FLOPs = 4T per frozen matmul weight (90368 with the head) + the attention core 6TsndL + each
    adapted site's declared (forward, backward) FLOPs; for LoRA r 4 that is 6·r·(m + n)·T per site, counted
    here by hand for q (64×64), v (32×64), down (64×128) in 2 layers, and equal to LoraAdapter.extra_flops."""
    _, doc = tiny_profile
    flops, tokens = doc["configs"][0]["flops"], doc["configs"][0]["throughput"]["tokens_per_step"]
    lora = 6 * 4 * ((64 + 64) + (32 + 64) + (64 + 128)) * 2 * tokens
    declared = sum(sum(get_method("lora").adapter_cls.extra_flops(SiteShape(t, m, n), tokens,
                                                                     get_method("lora").config_cls(r=4)))
                   for t, m, n in (("q_proj", 64, 64), ("v_proj", 32, 64), ("down_proj", 64, 128))) * 2
    assert declared == lora
    assert flops["executed"] == 4 * 90368 * tokens + 6 * tokens * 16 * 64 * 2 + lora


def test_trace_opens_as_json_with_phase_and_adapter_ranges(tiny_profile):
    """The bounded trace is gzipped Chrome-trace JSON with the rank, the step phases and each adapter site as
    named ranges."""
    out, doc = tiny_profile
    trace = json.load(gzip.open(out / "trace_rank0.json.gz"))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"phase:forward", "phase:backward", "phase:optimizer"} <= names
    assert "adapter:model.layers.1.mlp.down_proj" in names
    assert trace["distributedInfo"]["rank"] == 0
    assert (out / "phases.png").stat().st_size > 1000 and "## Phases" in (out / "profile.md").read_text()


def test_nvml_absent_is_reported_and_the_run_completes(tiny_profile):
    """Without a GPU the report says why there are no GPU figures (and the profile was written)."""
    _, doc = tiny_profile
    nv = doc["configs"][0]["nvml"]
    assert nv["available"] is False and "cpu" in nv["reason"]

    class Missing:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    sampler = NvmlSampler("cuda:0", nvml=Missing())
    with sampler:
        pass
    assert sampler.summary() == {"available": False, "reason": "RuntimeError: NVML Shared Library Not Found"}


def test_nvml_sampler_reads_the_gpu_with_torchs_pci_bus_id(monkeypatch):
    """The handle is opened by the PCI bus id torch reports for the CUDA device (not by index: CUDA_VISIBLE_DEVICES
    remaps indices); utilisation, power, energy per step and throttle reasons come from its samples."""
    props = types.SimpleNamespace(pci_bus_id=0x1B, pci_device_id=0, pci_domain_id=0, uuid="x")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    energy = iter(range(0, 10**9, 5000))

    class FakeNvml:
        NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0
        opened = []

        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetHandleByPciBusId(self, bus): self.opened.append(bus); return "gpu-1b"
        def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3"
        def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=90, memory=40)
        def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=2**30)
        def nvmlDeviceGetPowerUsage(self, h): return 500_000
        def nvmlDeviceGetTotalEnergyConsumption(self, h): return next(energy)
        def nvmlDeviceGetClockInfo(self, h, clock): return 1980
        def nvmlDeviceGetTemperatureV(self, h, sensor): return 61
        def nvmlDeviceGetCurrentClocksEventReasons(self, h): return 0x4

    fake = FakeNvml()
    sampler = NvmlSampler("cuda:0", interval_s=0.01, nvml=fake)
    with sampler:
        pass
    summary = sampler.summary(steps=2, tokens=100)
    assert fake.opened == ["00000000:1B:00.0"]
    assert summary["gpu"] == "NVIDIA H100 80GB HBM3" and summary["power_w"]["mean"] == 500.0
    joules = summary["energy_j"]
    assert joules > 0 and summary["energy_j_per_step"] == joules / 2 and summary["throttle_reasons"] == ["sw_power_cap"]


def test_bus_bandwidth_factors_are_nccl_tests():
    """busbw/algbw: all-reduce 2(n−1)/n, all-gather (n−1)/n, broadcast 1, with n the op's own group."""
    assert bus_factor("all_reduce", 2) == 1.0 and bus_factor("all_reduce", 8) == 1.75
    assert bus_factor("all_gather", 4) == 0.75 and bus_factor("broadcast", 4) == 1.0


def test_peaks_come_from_the_planners_table_by_device_name():
    """MFU's peak is the roofline table's dense bf16 figure for the device torch names (PCIe and NVL H100s apart
    from SXM); on CPU or an unknown GPU none is guessed; --peak-tflops overrides."""
    assert device_peak("NVIDIA H100 80GB HBM3")[0] == 989e12 and device_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert device_peak("NVIDIA H100 NVL")[0] == 835e12 and device_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert device_peak("cpu")[0] is None and device_peak("Tesla T4")[0] is None
    assert device_peak("cpu", 100.0)[0] == 100e12


def test_training_log_reaches_tensorboard_with_profiled_figures(tmp_path):
    """With ``log.tensorboard`` and a ``profile`` section, the loss of every step and the profiled step time
    are in TensorBoard event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_peft.train.config import from_dict
    from dist_peft.train.loop import Trainer

    raw = tiny_config(tmp_path / "run", train={**TRAIN, "steps": 2}).to_dict()
    cfg = from_dict({**raw, "profile": {"every": 1}, "log": {"tensorboard": str(tmp_path / "tb")}})
    trainer = Trainer(cfg, echo=lambda _m: None)
    trainer.run()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in trainer.history if "loss" in r], rel=1e-6)
    assert len(events.Scalars("profile/step_s")) == 2 and "profile/phase/forward_s" in events.Tags()["scalars"]


def _profile_config(config: str, out: str) -> bool:
    """One rank of ``dist-peft profile --config CONFIG`` (2 measured steps after 1 warm-up, no evaluation)."""
    from dist_peft.train.config import load_config

    cfg = load_config(config, {"output.dir": f"{out}/run", "data.eval_examples": 0})
    profile([("run", cfg)], Settings(steps=2, warmup=1, nvml_interval_s=0), out, frozen=False, echo=lambda _m: None)
    return True


def _rows(doc: dict, rank: int, source: str) -> dict:
    """(op, group) -> the profile's collective row of ``rank`` issued by ``source``."""
    return {(c["op"], c["group"]): c for c in doc["configs"][0]["collectives"][str(rank)] if c["source"] == source}


def _assert_busbw_uses_the_group_size(rows) -> None:
    for c in rows:
        if c["algbw_GBps"] is not None:
            assert c["busbw_GBps"] == pytest.approx(c["algbw_GBps"] * bus_factor(c["op"], c["group_size"]))


def test_tp2_pp2_profile_has_every_rank_and_the_megatron_collective_counts(tmp_path):
    """NPROC=4 megatron TP2×PP2 (configs/tiny-lora-tp2pp2.yaml: LoRA r 4 on all 7 projections, 2 layers, 2
    micro-batches of 4×32 tokens, h 64): a record for each of the 4 ranks; per step, as tests/test_megatron.py's
    _frozen_calls counts them, TP all-reduces = 2 micro-batches × (2 row-site outputs forward + column-site input
    gradients backward: 1 on the first stage, whose layer-0 qkv input needs none, 2 on the second) + 1 coalesced
    TP-partial adapter gradient sum, then one loss sum over PP, the step check over the world (loss, gradient norm²
    and non-finite flag in float64: 24 B; train/guards.py) and one gradient norm over TP×PP. Bytes: each
    per-token all-reduce moves 4·32·64 fp32 = 32768 B; the partial gradients are the column sites' A (5 × 4×64)
    and the row sites' B (2 × 64×4) = 1792 fp32; the scalars 8 B. The meter's counts equal TRACE's; busbw uses
    each group's own size (tp 2, pp 2, tp×pp 4)."""
    run_dist(_profile_config, 4, config="configs/tiny-lora-tp2pp2.yaml", out=str(tmp_path))
    doc = json.loads((tmp_path / "profile.json").read_text())
    run = doc["configs"][0]
    assert set(run["rank_steps"]) == set(run["memory"]) == set(run["collectives"]) == {"0", "1", "2", "3"}
    assert run["layout"] == {"tensor": 2, "pipeline": 2, "data": 1, "zero_stage": 0}
    for rank in range(4):
        backward = 1 if rank < 2 else 2  # pipeline stage 0 holds ranks 0, 1
        tp = _rows(doc, rank, "dist_peft")
        per_token = 2 * (2 + backward)
        assert tp["all_reduce", "tp"]["calls_per_step"] == per_token + 1
        assert tp["all_reduce", "tp"]["bytes_per_step"] == per_token * 32768 + 1792 * 4
        assert tp["all_reduce", "pp"]["calls_per_step"] == tp["all_reduce", "tp×pp"]["calls_per_step"] == 1
        assert tp["all_reduce", "pp"]["bytes_per_step"] == tp["all_reduce", "tp×pp"]["bytes_per_step"] == 8
        assert tp["all_reduce", "world"]["calls_per_step"] == 1 and tp["all_reduce", "world"]["bytes_per_step"] == 24
        assert {k: c["group_size"] for k, c in tp.items()} == {("all_reduce", "tp"): 2, ("all_reduce", "pp"): 2,
                                                              ("all_reduce", "tp×pp"): 4, ("all_reduce", "world"): 4}
        traced = run["collective_counts_per_step"][str(rank)]
        assert traced["calls"] == {"all_reduce": per_token + 4}
        assert traced["bytes"]["all_reduce"] == sum(c["bytes_per_step"] for c in tp.values())
        _assert_busbw_uses_the_group_size(run["collectives"][str(rank)])
        assert sum(run["rank_steps"][str(rank)][0]["phases"].values()) == \
            pytest.approx(run["rank_steps"][str(rank)][0]["time_s"], rel=1e-9)


def test_zero2_profile_observes_deepspeeds_own_collectives(tmp_path):
    """2-rank ZeRO-2 (configs/tiny-lora-zero2.yaml): a record for both ranks; dist_peft's traced collectives per
    step are plain data parallelism's three (tests/test_multiprocess.py) less the gradient reduction, which
    DeepSpeed does: the target and token counts (2 fp32) and the step check (loss, gradient norm² and non-finite
    flag in float64, train/guards.py), 8 + 24 = 32 B. DeepSpeed's own, observed at its
    comm backend: the gradients reduced over the ZeRO group (4 B × the 8192 adapter elements, plus its fp32
    gradient norm) and the updated partitions all-gathered (4 B × 8192); busbw with the group's size 2."""
    run_dist(_profile_config, 2, config="configs/tiny-lora-zero2.yaml", out=str(tmp_path))
    doc = json.loads((tmp_path / "profile.json").read_text())
    run = doc["configs"][0]
    assert set(run["rank_steps"]) == set(run["memory"]) == {"0", "1"}
    assert run["layout"]["zero_stage"] == 2 and run["trainable"] == 8192
    for rank in range(2):
        assert run["collective_counts_per_step"][str(rank)] == {"calls": {"all_reduce": 2}, "bytes": {"all_reduce": 32}}
        ours, ds = _rows(doc, rank, "dist_peft"), _rows(doc, rank, "deepspeed")
        assert ours["all_reduce", "world"]["bytes_per_step"] == 32
        assert ds["all_gather", "dp (ZeRO)"]["bytes_per_step"] == 4 * 8192
        reduced = sum(c["bytes_per_step"] for (op, _), c in ds.items() if op in ("all_reduce", "reduce_scatter"))
        assert reduced == 4 * 8192 + 4
        assert all(c["group_size"] == 2 for c in ds.values())
        _assert_busbw_uses_the_group_size(run["collectives"][str(rank)])


def test_compare_pairs_each_step_with_the_frozen_step_of_its_round():
    """The paired ratio is the median over rounds of a configuration's step ÷ the frozen step of the same round:
    the machine's speed changing between rounds (×2, ×4) and one slow step (2.5 s in a 1 s round) move the ratio of
    medians (1.25), not the paired ratio (1.1)."""
    from dist_peft.profile.report import compare_table

    def summary(name, steps):
        return {"name": name, "method": name, "trainable": 0, "memory": {},
                "step_time_s": {"job_median": statistics.median(steps), "per_step": steps},
                "throughput": {"tokens_per_s": 1.0}}

    frozen, lora = compare_table([summary("frozen", [1.0, 2.0, 4.0]), summary("lora", [2.5, 2.2, 4.4])])
    assert frozen["paired"] == 1.0
    assert lora["vs_frozen"] == pytest.approx(1.25) and lora["paired"] == pytest.approx(1.1)


def test_allocation_peak_follows_allocations_and_frees_in_order():
    """``allocation_peak`` is the running maximum of the bytes allocated inside the call and not yet freed: 3 MiB
    where 1 + 2 MiB live at once, 2 MiB where the first is freed before the second exists; a tensor allocated
    before the call counts neither while held nor when freed inside (whatever the allocator reports of it)."""
    from dist_peft.profile.memory import allocation_peak

    mib = 2**20
    held = [torch.empty(4 * mib, dtype=torch.uint8)]

    def overlapping():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b

    def sequential():
        held.clear()  # frees 4 MiB allocated before the call
        a = torch.empty(mib, dtype=torch.uint8)
        del a
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del b

    assert allocation_peak(overlapping) == 3 * mib
    assert allocation_peak(sequential) == 2 * mib

    # The CPU allocator reports the free of an address it saw allocated under an earlier profile, with that old
    # size, even when the tensor now there was allocated outside any profile: such frees are not counted.
    kept: list = []
    allocation_peak(lambda: kept.extend(torch.empty(1000, dtype=torch.uint8) for _ in range(200)))
    kept.clear()  # freed outside any profiled call
    held[:] = [torch.empty(1000, dtype=torch.uint8) for _ in range(200)]  # reusing some of those addresses

    def free_then_allocate():
        held.clear()
        b = torch.empty(mib, dtype=torch.uint8)
        del b

    assert allocation_peak(free_then_allocate) == mib

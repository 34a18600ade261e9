#!/usr/bin/env bash
# The distributed method benchmark (docs/benchmarks.md, "Distributed"): the six methods and the frozen base,
# interleaved by the profiler (`dist-peft profile`, the one timing harness), in three runs of the configs of
# configs/bench/llama8b-width:
#   tp2     megatron-core tensor parallel 2, 2 ranks, at the model's width (default: Llama-3.1-8B's);
#   single  one process at the TP2 per-rank shape (what one TP2 rank multiplies: heads, KV heads, intermediate
#           and vocabulary halved, head width kept);
#   zero2   DeepSpeed ZeRO-2, 2 ranks, at the same per-rank shape (each rank multiplies the whole model).
# then prints the table: × frozen per run (paired: the median over rounds of each step ÷ the frozen step of the
# same round), TP2 and ZeRO-2 minus the single process, and rank 0's collectives per step (all of them, and those
# beyond the frozen base's).
#
#   flock /tmp/dist_peft_mp.lock nice -n 10 tools/bench_distributed.sh            # OUT=runs/bench/distributed
#   STEPS=3 WARMUP=1 SEQ=32 tools/bench_distributed.sh                             # a quick look
#   RUNS=single tools/bench_distributed.sh; RUNS="tp2 zero2" ...  # some runs (one process needs no lock)
#   RUNS= OUT=DIR tools/bench_distributed.sh                                       # the table of an earlier run
#
# Shape and batch (environment; defaults: the configs' values): HIDDEN 4096, INTER 14336, HEADS 32, KV 8,
# HEAD_DIM 128, VOCAB 1024, LAYERS 2, SEQ 64, MICRO 4 (sequences per rank and step); STEPS 8 measured rounds
# after WARMUP 2. Every rank runs 1 thread (train.threads). Ratios compare within one run only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench/distributed}
RUNS=${RUNS-single tp2 zero2}
HIDDEN=${HIDDEN:-4096} INTER=${INTER:-14336} HEADS=${HEADS:-32} KV=${KV:-8} HEAD_DIM=${HEAD_DIM:-128}
VOCAB=${VOCAB:-1024} LAYERS=${LAYERS:-2} SEQ=${SEQ:-64} MICRO=${MICRO:-4} STEPS=${STEPS:-8} WARMUP=${WARMUP:-2}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

configs=()
for m in lora loca folora frod odlora scalora; do configs+=(--config "configs/bench/llama8b-width/$m.yaml"); done
shape() {  # --set arguments of a model of the given heads, KV heads, intermediate and vocabulary
  echo --set model.tiny.hidden_size="$HIDDEN" --set model.tiny.head_dim="$HEAD_DIM" \
    --set model.tiny.num_hidden_layers="$LAYERS" --set model.tiny.num_attention_heads="$1" \
    --set model.tiny.num_key_value_heads="$2" --set model.tiny.intermediate_size="$3" \
    --set model.tiny.vocab_size="$4" --set data.seq_len="$SEQ" --set train.micro_batch_size="$MICRO"
}
full=$(shape "$HEADS" "$KV" "$INTER" "$VOCAB")
per_rank=$(shape $((HEADS / 2)) $((KV / 2)) $((INTER / 2)) $((VOCAB / 2)))
common=(--steps "$STEPS" --warmup "$WARMUP" --nvml-interval 0 --frozen)

run() { [[ " $RUNS " == *" $1 "* ]]; }
# shellcheck disable=SC2086  # the shape's --set words split on purpose
run single && "$PY" tools/profiler.py "${configs[@]}" $per_rank "${common[@]}" --out "$OUT/single"
# shellcheck disable=SC2086
run tp2 && "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 tools/profiler.py "${configs[@]}" $full \
  --set parallel.tensor=2 "${common[@]}" --out "$OUT/tp2"
# shellcheck disable=SC2086
run zero2 && "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 tools/profiler.py "${configs[@]}" \
  $per_rank --set deepspeed.zero_stage=2 "${common[@]}" --out "$OUT/zero2"

"$PY" - "$OUT" "$MICRO" "$SEQ" "$HIDDEN" <<'EOF'
import json, sys
from pathlib import Path

out, micro, seq, hidden = Path(sys.argv[1]), *map(int, sys.argv[2:])
missing = [run for run in ("tp2", "single", "zero2") if not (out / run / "profile.json").exists()]
if missing:
    sys.exit(f"table: no {', '.join(missing)} run in {out} yet")
docs = {run: json.loads((out / run / "profile.json").read_text()) for run in ("tp2", "single", "zero2")}
ratio = {run: {r["name"]: r.get("paired") or r["vs_frozen"] for r in d["compare"]} for run, d in docs.items()}


def per_step(cfg):
    """(source, op, group) -> [calls, bytes] per step on rank 0."""
    return {(c["source"], c["op"], c["group"]): [c["calls_per_step"], c["bytes_per_step"]]
            for c in cfg["collectives"]["0"]}


def size(b):
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB" if b >= 2**10 else f"{b:.0f} B"


def listing(rows):
    return "; ".join(f"{op} {group}{' (DS)' if src == 'deepspeed' else ''} {calls:g}× {size(b)}"
                     for (src, op, group), (calls, b) in sorted(rows.items()) if calls) or "none"


def beyond(cfg, frozen):
    """Collectives beyond the frozen base's: per key, the extra calls and bytes (per call)."""
    mine, base = per_step(cfg), per_step(frozen)
    extra = {k: [v[0] - base.get(k, [0, 0])[0], v[1] - base.get(k, [0, 0])[1]] for k, v in mine.items()}
    return {k: v for k, v in extra.items() if v[0] > 0}


print(f"Activation of one micro-batch: {micro}×{seq}×{hidden}×4 B = {size(micro * seq * hidden * 4)} "
      f"(a per-token collective moves about this per call).\n")
print("| method | × frozen TP2 | × frozen 1 process | TP2 − 1 process | × frozen ZeRO-2 | ZeRO-2 − 1 process |")
print("|---|---:|---:|---:|---:|---:|")
for name in ratio["tp2"]:
    t, s, z = ratio["tp2"][name], ratio["single"][name], ratio["zero2"][name]
    print(f"| {name} | {t:.3f} | {s:.3f} | {t - s:+.3f} | {z:.3f} | {z - s:+.3f} |")
for run in ("tp2", "zero2"):
    cfgs = docs[run]["configs"]
    frozen = next(c for c in cfgs if c["method"] == "frozen")
    print(f"\n{run}: collectives per step on rank 0 (DS: DeepSpeed's own; others dist_peft's traced layer)\n")
    print("| method | all | beyond the frozen base (per call) |")
    print("|---|---|---|")
    for c in cfgs:
        extra = beyond(c, frozen)
        shown = "; ".join(f"{op} {group}{' (DS)' if src == 'deepspeed' else ''} +{n:g}× ({size(b / n)})"
                          for (src, op, group), (n, b) in sorted(extra.items())) or "none"
        print(f"| {c['name']} | {listing(per_step(c))} | {'-' if c is frozen else shown} |")
EOF

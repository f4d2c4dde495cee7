#!/usr/bin/env bash
# Peak memory of the CPU benchmark shape (OPT-125M, 4 pairs per step, max_length 256, the
# 64 HH-RLHF pairs, 4 steps) under each memory setting: full fine-tuning or LoRA r16
# all-linear (QLoRA: its base 4-bit NF4), gradient checkpointing off/on, f32 or bf16 products,
# torch's AdamW or bitsandbytes' 8-bit one (`optim.optimizer = "adamw_8bit"`).
# Prints one line per setting
# (peak RSS from /usr/bin/time, tokens/s of steps 2-4); the model comes from
# scripts/bench-cpu.sh's generator.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${BENCH_DIR:-target/bench}
mkdir -p "$WORK"
cargo build --release --bin orpo --example make_bench_model
[ -f "$WORK/opt-125m/model.safetensors" ] || target/release/examples/make_bench_model opt-125m "$WORK/opt-125m"
cat > "$WORK/mem.toml" <<TOML
[model]
id = "$WORK/opt-125m"
[data]
train = "examples/data/hh-rlhf-64.jsonl"
max_length = 256
max_prompt_length = 256
[optim]
lr = 8e-6
[train]
batch_size = 4
max_steps = 4
shuffle = false
log_every = 1
output_dir = "$WORK/mem-run"
[lora]
r = 16
alpha = 32
TOML
printf "%-34s %12s %10s\n" setting "peak RSS" "tokens/s"
run() {
  local label=$1; shift
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  /usr/bin/time -f "%M" -o "$WORK/mem_kb" target/release/orpo train --config "$WORK/mem.toml" --overwrite "${sets[@]}" 2>/dev/null
  python3 - "$WORK" "$label" <<'PY'
import json, sys
work, label = sys.argv[1:3]
rows = [json.loads(l) for l in open(f"{work}/mem-run/metrics.jsonl")]
tps = sum(r["tokens"] for r in rows[1:]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])
kb = int(open(f"{work}/mem_kb").read().split()[-1])
print(f"{label:<34} {kb / 2**20:9.2f} GiB {tps:10.1f}")
PY
}
run "full f32"
run "full f32 + checkpointing" train.gradient_checkpointing=true
run "full bf16 + checkpointing" train.gradient_checkpointing=true model.dtype=bf16
run "full f32 + ckpt, 8-bit AdamW" train.gradient_checkpointing=true optim.optimizer=adamw_8bit
run "full bf16 + ckpt, 8-bit AdamW" train.gradient_checkpointing=true model.dtype=bf16 optim.optimizer=adamw_8bit
run "LoRA f32" lora.enabled=true
run "LoRA f32 + checkpointing" lora.enabled=true train.gradient_checkpointing=true
run "LoRA bf16 + checkpointing" lora.enabled=true train.gradient_checkpointing=true model.dtype=bf16
run "QLoRA nf4 f32 + checkpointing" lora.enabled=true lora.quantize=nf4 train.gradient_checkpointing=true
run "QLoRA nf4 bf16 + checkpointing" lora.enabled=true lora.quantize=nf4 train.gradient_checkpointing=true model.dtype=bf16

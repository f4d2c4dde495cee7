#!/usr/bin/env bash
# CPU benchmark: the OPT-125M-shaped workload (float32, 64 HH-RLHF pairs, 4 pairs per step,
# max_length 256, file order, 6 steps, the first a warm-up). Prints orpo's tokens/s and peak
# RSS; when a Python with TRL is available (PYTHON=..., default python3) and the project's
# shared tools sit beside the checkout, runs TRL's bench_trl.py right after on the same model
# and prints the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${BENCH_DIR:-target/bench}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
cargo build --release --bin orpo --example make_bench_model
[ -f "$WORK/opt-125m/model.safetensors" ] || target/release/examples/make_bench_model opt-125m "$WORK/opt-125m"
cat > "$WORK/bench.toml" <<TOML
[model]
id = "$WORK/opt-125m"
[data]
train = "examples/data/hh-rlhf-64.jsonl"
max_length = 256
max_prompt_length = 256
[orpo]
beta = 0.1
[optim]
lr = 8e-6
[train]
batch_size = 4
max_steps = 6
shuffle = false
log_every = 1
output_dir = "$WORK/run"
TOML
/usr/bin/time -f "%M" -o "$WORK/rss_kb" target/release/orpo train --config "$WORK/bench.toml" --overwrite
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
rows = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl")]
toks = sum(r["tokens"] for r in rows[1:])
secs = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
rss = int(open(f"{work}/rss_kb").read().split()[-1]) / 2**20
res = dict(tool="orpo", tokens_per_s=toks / secs, peak_rss_gib=rss, timed_steps=len(rows) - 1)
print(json.dumps(res))
json.dump(res, open(f"{work}/orpo.json", "w"))
PY
TOOLS=../shared/tools
if [ -f "$TOOLS/bench_trl.py" ] && "$PY" -c "import trl" 2>/dev/null; then
  "$PY" "$TOOLS/bench_trl.py" "$WORK/opt-125m" examples/data/hh-rlhf-64.jsonl | tail -1 | tee "$WORK/trl.json"
  python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
o = json.load(open(f"{w}/orpo.json")); t = json.loads(open(f"{w}/trl.json").read())
print(f"tokens/s: orpo {o['tokens_per_s']:.1f}, TRL {t['tokens_per_s']:.1f}, ratio {o['tokens_per_s'] / t['tokens_per_s']:.2f}x")
print(f"peak RSS: orpo {o['peak_rss_gib']:.2f} GiB, TRL {t['peak_rss_mib'] / 1024:.2f} GiB")
PY
else
  echo "(TRL baseline skipped: set PYTHON to a Python with trl, and keep ../shared/tools beside the checkout)"
fi

#!/usr/bin/env bash
# Gathers what scripts/gpu-check.sh needs on the lent GPU machine (no network, no Rust) into
# target/gpu-package/ (ignored by git; the device tool carries it when `carry` names it):
#   orpo.xz              the CUDA binary (target/cuda/release/orpo from scripts/build-cuda.sh),
#                        stripped and xz-compressed
#   compare_runs.xz, make_bench_model.xz   CPU examples (release, stripped): they run there too
#   data/hh-256.jsonl    the first 256 pairs of ../shared/data/hh-rlhf-harmless/test-2000.jsonl
#   tools/               ../shared/tools/bench_trl.py and make_bench_model.py (TRL's baseline)
#   wheels/              trl 1.16.0, datasets 5.2.0, dill, multiprocess (pure Python, no deps;
#                        the machine has torch, transformers, peft, accelerate, pyarrow, ...);
#                        wheels/alt/ datasets 4.8.5 (pyarrow>=21) in case 5.2.0 fails to import
#   MANIFEST.txt         git revision, dirty files, build times, sizes, sha256
# Fixtures, configs, examples/bench/gpt2-tokenizer and scripts/gpu-check.sh travel with the
# working tree. Prints the `run` call(s) to make.
#
# GPU_PACKAGE_BUILD_CUDA=1 runs scripts/build-cuda.sh first (about 18 minutes cold on 2 cores,
# seconds to minutes when only src/ changed). GPU_PACKAGE_ALLOW_STALE=1 packs a CUDA binary
# older than the sources (otherwise refused).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=target/gpu-package
SHARED=${SHARED_DIR:-../shared}
CUDA_BIN=target/cuda/release/orpo

if [ "${GPU_PACKAGE_BUILD_CUDA:-0}" = 1 ]; then
  scripts/build-cuda.sh
fi
cargo build --release --example compare_runs --example make_bench_model

[ -x "$CUDA_BIN" ] || { echo "no $CUDA_BIN: run scripts/build-cuda.sh first" >&2; exit 1; }
newest_src=$(find src build.rs Cargo.toml Cargo.lock vendor -type f -newer "$CUDA_BIN" 2>/dev/null | head -n 5 || true)
if [ -n "$newest_src" ]; then
  echo "warning: $CUDA_BIN is older than: $(echo $newest_src)" >&2
  if [ "${GPU_PACKAGE_ALLOW_STALE:-0}" != 1 ]; then
    echo "rebuild it (scripts/build-cuda.sh) or set GPU_PACKAGE_ALLOW_STALE=1" >&2
    exit 1
  fi
fi

rm -rf "$PKG"
mkdir -p "$PKG/data" "$PKG/tools" "$PKG/wheels/alt"
pack() { # SRC NAME: strip, then xz
  strip -o "$PKG/$2" "$1"
  xz -T0 -6 -f "$PKG/$2"
}
pack "$CUDA_BIN" orpo
pack target/release/examples/compare_runs compare_runs
pack target/release/examples/make_bench_model make_bench_model

head -n 256 "$SHARED/data/hh-rlhf-harmless/test-2000.jsonl" >"$PKG/data/hh-256.jsonl"
[ "$(wc -l <"$PKG/data/hh-256.jsonl")" = 256 ] || { echo "fewer than 256 pairs" >&2; exit 1; }
cp "$SHARED/tools/bench_trl.py" "$SHARED/tools/make_bench_model.py" "$PKG/tools/"

# TRL and what it needs beyond the machine's image (see /work/.library/device/KINDS.md):
# trl -> datasets -> dill, multiprocess (xxhash, pyarrow, pandas, fsspec, ... are there).
WHEELS=target/gpu-wheels
PIPARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$WHEELS/alt"
ls "$WHEELS"/trl-1.16.0-*.whl "$WHEELS"/datasets-5.2.0-*.whl "$WHEELS"/dill-0.4.1-*.whl \
  "$WHEELS"/multiprocess-0.70.19-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q "${PIPARGS[@]}" -d "$WHEELS" trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
ls "$WHEELS"/alt/datasets-4.8.5-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q "${PIPARGS[@]}" -d "$WHEELS/alt" datasets==4.8.5
cp "$WHEELS"/*.whl "$PKG/wheels/"
cp "$WHEELS"/alt/*.whl "$PKG/wheels/alt/"

{
  echo "built $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml vendor 2>/dev/null || echo '+dirty')"
  echo "cuda binary $(date -u -r "$CUDA_BIN" +%FT%TZ) sha256 $(sha256sum "$CUDA_BIN" | cut -c1-16)"
  (cd "$PKG" && find . -type f ! -name MANIFEST.txt -printf '%s %p\n' | sort -k2)
} >"$PKG/MANIFEST.txt"

pkg_bytes=$(du -sb "$PKG" | cut -f1)
tree_bytes=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 du -cb 2>/dev/null |
  awk '$2=="total"{s+=$1} END{print s+0}')
total=$((pkg_bytes + tree_bytes))
awk -v p="$pkg_bytes" -v t="$tree_bytes" -v d="$PKG" 'BEGIN{m=1048576; printf "package %s: %.1f MiB; working tree %.1f MiB; together %.1f MiB of the 64 MiB a call carries\n", d, p/m, t/m, (p+t)/m}'
[ "$total" -lt $((62 * 1048576)) ] || echo "WARNING: over 62 MiB; the call may be refused" >&2
cat "$PKG/MANIFEST.txt"
cat <<EOF

Device call (the run tool; 15 minutes of device time a session, start-up included; "all" took
~220 s on an H200, parity ~45 s of it):
  run(command="GPU_CHECK_BUDGET=430 bash scripts/gpu-check.sh all", carry=["$PKG"], timeout_s=460)
Phases run in the order given (all = parity opt-125m llama-1b mistral-7b); what no longer fits
the budget is skipped and listed in gpu-results.md. With device time left, follow up at once
(the machine stays warm 30 s), e.g. a second reading of a workload or where its time goes:
  run(command="GPU_CHECK_TRL=0 GPU_CHECK_BUDGET=200 bash scripts/gpu-check.sh profile:llama-1b", carry=["$PKG"], timeout_s=220)
The fused attention op (ORPO_FUSED_ATTENTION=1, off by default until it has run on a GPU), the
attention chain kept for backward (chain: ORPO_RECOMPUTE_ATTENTION=0) and CUDA's default
memory pool (trim: ORPO_KEEP_GPU_MEMORY=0), cudarc's per-allocation events (events:
ORPO_CUDA_EVENTS=1) and the gathered attention as one padded batch (groups1:
ORPO_ATTENTION_GROUPS=1) beside the default path, then where the time goes
(the fused path's if its parity passed), in one call (~500 s by the H200's durations; the
profile comes last, so an overrun skips it rather than a benchmark):
  run(command="GPU_CHECK_BUDGET=550 bash scripts/gpu-check.sh parity parity-fused llama-1b fused:llama-1b groups1:llama-1b chain:llama-1b trim:llama-1b mistral-7b fused:mistral-7b events:mistral-7b profile-auto:llama-1b", carry=["$PKG"], timeout_s=580)
If a parity case fails, parity-nokernels (ORPO_CUDA_KERNELS=0: the project's own CUDA kernels
off, candle ops instead) tells their faults from the rest:
  run(command="GPU_CHECK_TRL=0 GPU_CHECK_BUDGET=200 bash scripts/gpu-check.sh parity-nokernels", carry=["$PKG"], timeout_s=220)
Each call's results come back under files_at: gpu-results.md, gpu-results.json (both rewritten
after each phase, marked partial until the end; the kernel checks first), results.jsonl,
kernels.jsonl, gpu-check.log, gpu-runs.tar.xz
(copy them out before the next call: \$OUT is emptied).
EOF

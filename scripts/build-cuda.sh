#!/usr/bin/env bash
# Builds `orpo` with candle's CUDA backend on a machine without a GPU or CUDA toolkit, from
# PyPI's CUDA 13.0 wheels (the lent GPU machines run driver 580 / CUDA 13.0, compute 9.0).
# Output: target/cuda/release/orpo (its own target dir, so the CPU build is untouched; dynamically linked against libcuda, cuBLAS, cuRAND and the CUDA runtime, which
# the GPU machine provides; run there with LD_LIBRARY_PATH=/usr/local/cuda/lib64).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLKIT=${CUDA_TOOLKIT_DIR:-target/cuda-toolkit}
C="$PWD/$TOOLKIT/nvidia/cu13"
if [ ! -x "$C/bin/nvcc" ]; then
  mkdir -p "$TOOLKIT/wheels"
  python3 -m pip download --no-deps --only-binary=:all: -d "$TOOLKIT/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 "nvidia-curand>=10.4,<10.5"
  for w in "$TOOLKIT"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TOOLKIT"; done
  chmod +x "$C"/bin/* "$C"/nvvm/bin/* 2>/dev/null || true
  # Unversioned names for the linker where the wheels ship only libX.so.N.
  for f in "$C"/lib/lib*.so.*; do
    base="${f%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
  done
fi
# libcuda comes with the driver, in no wheel: link against a stub that defines the driver API
# symbols candle's dependencies reference; the device's real libcuda.so.1 is loaded at run time.
STUBS="$C/lib/stubs"
# The symbols come from cudarc's sources, which a fresh machine has only once cargo fetched
# them; a stub made before that defines nothing and the link fails (seen), so it is remade.
if [ ! -s "$STUBS/cuda_stub.c" ] || [ "$(wc -l < "$STUBS/cuda_stub.c")" -lt 2 ]; then
  rm -f "$STUBS/libcuda.so" "$STUBS/libcuda.so.1"
fi
if [ ! -e "$STUBS/libcuda.so" ]; then
  mkdir -p "$STUBS"
  cargo fetch --locked
  syms=$(grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*(_v[0-9]+)?\b' ~/.cargo/registry/src/*/cudarc-*/src/driver/sys/ 2>/dev/null | sort -u || true)
  if [ -z "$syms" ]; then
    echo "build-cuda.sh: no cudarc driver sources under ~/.cargo/registry/src to take the libcuda stub's symbols from" >&2
    exit 1
  fi
  {
    echo "/* generated stub: never called, replaced by the driver's libcuda at run time */"
    for s in $syms; do echo "void $s(void) {}"; done
  } > "$STUBS/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/cuda_stub.c"
  ln -sf libcuda.so "$STUBS/libcuda.so.1"
fi
export PATH="$C/bin:$PATH" CUDA_HOME="$C" CUDA_PATH="$C" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L $C/lib -L $STUBS"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --features cuda --bin orpo
echo "built ${CARGO_TARGET_DIR:-target/cuda}/release/orpo with CUDA"

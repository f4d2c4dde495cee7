//! With the `cuda` feature, compiles the project's own CUDA kernels (`src/train/adamw.cu`,
//! `src/train/odds.cu`, `src/ops/attn_softmax.cu`, `src/ops/swiglu.cu`, `src/ops/rms_norm.cu`,
//! `src/ops/logprob_sum.cu`) to PTX with nvcc, as candle-kernels does for candle's; the driver
//! compiles the PTX for the card when the module is first loaded. Without the feature nothing
//! runs here. (`scripts/cuda-emu/check.sh` runs the kernels on a CPU for sessions without a
//! GPU.)

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-changed=src/ops/block_reduce.cuh");
    println!("cargo:rerun-if-changed=src/ops/dtype.cuh");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for (src, ptx) in [
        ("src/train/adamw.cu", "adamw.ptx"),
        ("src/ops/attn_softmax.cu", "attn_softmax.ptx"),
        ("src/ops/swiglu.cu", "swiglu.ptx"),
        ("src/ops/rms_norm.cu", "rms_norm.ptx"),
        ("src/ops/logprob_sum.cu", "logprob_sum.ptx"),
        ("src/train/odds.cu", "odds.ptx"),
    ] {
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                &format!("--gpu-architecture=compute_{cap}"),
                "-o",
            ])
            .arg(out_dir.join(ptx))
            .arg(src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed on {src}: {s}"),
            Err(e) => panic!(
                "cannot run {nvcc} ({e}): the cuda feature needs the CUDA toolkit (scripts/build-cuda.sh)"
            ),
        }
    }
}

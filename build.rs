//! With the `cuda` feature, compiles the project's own CUDA kernels (`src/train/adamw.cu`,
//! `src/train/adamw8bit.cu`, `src/train/odds.cu`, `src/train/sum_sq.cu`,
//! `src/ops/attn_softmax.cu`, `src/ops/swiglu.cu`, `src/ops/gather.cu`, `src/ops/rms_norm.cu`,
//! `src/ops/logprob_sum.cu`, `src/ops/nf4.cu`) to PTX with nvcc, as
//! candle-kernels does for candle's; the driver compiles the PTX for the card when the module
//! is first loaded. Without the feature nothing runs here. (`scripts/cuda-emu/check.sh` runs
//! the kernels on a CPU for sessions without a GPU.)

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
    let cap = compute_cap();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for (src, ptx) in [
        ("src/train/adamw.cu", "adamw.ptx"),
        ("src/train/adamw8bit.cu", "adamw8bit.ptx"),
        ("src/ops/attn_softmax.cu", "attn_softmax.ptx"),
        ("src/ops/swiglu.cu", "swiglu.ptx"),
        ("src/ops/gather.cu", "gather.ptx"),
        ("src/ops/rms_norm.cu", "rms_norm.ptx"),
        ("src/ops/logprob_sum.cu", "logprob_sum.ptx"),
        ("src/train/odds.cu", "odds.ptx"),
        ("src/train/sum_sq.cu", "sum_sq.ptx"),
        ("src/ops/nf4.cu", "nf4.ptx"),
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

/// The PTX's target, as candle-kernels picks its own: `CUDA_COMPUTE_CAP`, else the first GPU's
/// capability from `nvidia-smi`, else 8.0 (PTX runs on that capability and newer ones, and
/// the kernels need nothing past Ampere's bf16).
fn compute_cap() -> String {
    if let Ok(cap) = env::var("CUDA_COMPUTE_CAP") {
        return cap.trim().replace('.', "");
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(out) = smi {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(cap) = text.lines().next().map(|l| l.trim().replace('.', "")) {
            if out.status.success() && !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) {
                return cap;
            }
        }
    }
    println!(
        "cargo:warning=no CUDA_COMPUTE_CAP and no GPU seen: the kernels' PTX targets compute_80"
    );
    "80".into()
}

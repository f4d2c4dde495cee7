//! The project's own CUDA kernels (`src/**/*.cu`), compiled as C++ for the CPU with
//! `scripts/cuda-emu/include/cuda_emu.h` standing in for the GPU, against references in double
//! (`scripts/cuda-emu/*_check.cpp`): their indexing, block reductions and arithmetic are
//! checked on every machine, with or without a GPU. What this cannot see (the launch from
//! Rust, the real device) `scripts/gpu-check.sh` checks on a GPU.

use std::process::Command;

#[test]
fn cuda_kernels_match_their_references_on_the_cpu() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/cuda-emu/check.sh"))
        .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .expect("run scripts/cuda-emu/check.sh (needs bash and g++ with C++20)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // Every check program ran and reported its cases.
    for name in [
        "adamw_check",
        "adamw8bit_check",
        "attn_softmax_check",
        "logprob_sum_check",
        "odds_check",
        "rms_norm_check",
        "sum_sq_check",
        "swiglu_check",
    ] {
        assert!(
            text.contains(&format!("== {name}")),
            "{name} did not run:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.matches("PASS").count() >= 53, "{text}");
}

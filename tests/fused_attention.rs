//! The golden tests again with attention's probabilities as one fused op
//! (`orpo::ops::set_fused_attention(true)`, `ORPO_FUSED_ATTENTION=1`) and the CPU kernels off, as
//! on CUDA: the op's CPU kernel, the same arithmetic as its CUDA kernels, is held to TRL's
//! numbers here (per-pair loss and metrics, per-parameter gradient norms, training logs, bf16).
//! What this cannot see is the CUDA kernel itself (scripts/gpu-check.sh compares the devices).
//!
//! As in `plain_ops.rs`, the test files are compiled in as modules and the switches are set
//! before `main`.

// Each included file declares its own `mod common;` (the shared helpers, loaded once per file).
#![allow(clippy::duplicate_mod)]

#[path = "bf16.rs"]
mod bf16;
#[path = "golden_forward.rs"]
mod golden_forward;
#[path = "golden_train.rs"]
mod golden_train;

extern "C" fn fused_attention_on() {
    orpo::ops::set_fused_kernels(false);
    orpo::ops::set_fused_attention(true);
}

// A constructor the loader runs before `main` (see plain_ops.rs).
#[used]
#[cfg_attr(
    any(target_os = "linux", target_os = "android", target_os = "freebsd"),
    link_section = ".init_array"
)]
#[cfg_attr(target_vendor = "apple", link_section = "__DATA,__mod_init_func")]
#[cfg_attr(windows, link_section = ".CRT$XCU")]
static FUSED_ATTENTION_ON: extern "C" fn() = fused_attention_on;

#[test]
fn fused_attention_is_on() {
    assert!(orpo::ops::fused_attention());
    assert!(!orpo::ops::fused_kernels());
}

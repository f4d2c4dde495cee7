//! The golden tests again, with the CPU kernels off (`orpo::ops::set_fused_kernels(false)`):
//! every op then takes the plain candle-op path that CUDA and bf16 take, and the optimizer
//! its on-device update, so that path is held to TRL's numbers here, on a machine without a
//! GPU. What this cannot see is a CUDA kernel itself (scripts/gpu-check.sh compares the two
//! devices).
//!
//! The test files are compiled in as modules (`#[path]`), so their tests run here unchanged;
//! the kernels are switched off before `main`, before any test thread exists.

// Each included file declares its own `mod common;` (the shared helpers, loaded once per file).
#![allow(clippy::duplicate_mod)]

#[path = "bf16.rs"]
mod bf16;
#[path = "golden_forward.rs"]
mod golden_forward;
#[path = "golden_train.rs"]
mod golden_train;

extern "C" fn kernels_off() {
    orpo::ops::set_fused_kernels(false);
}

// A constructor the loader runs before `main` (libtest has no per-binary set-up): the
// platform's initialiser section, as the `ctor` crate does it.
#[used]
#[cfg_attr(
    any(target_os = "linux", target_os = "android", target_os = "freebsd"),
    link_section = ".init_array"
)]
#[cfg_attr(target_vendor = "apple", link_section = "__DATA,__mod_init_func")]
#[cfg_attr(windows, link_section = ".CRT$XCU")]
static KERNELS_OFF: extern "C" fn() = kernels_off;

#[test]
fn the_kernels_are_off() {
    assert!(!orpo::ops::fused_kernels());
}

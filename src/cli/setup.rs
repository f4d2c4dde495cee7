//! Process set-up before any command: threads, the allocator, logging, and the `ORPO_*`
//! switches that turn kernels and memory behaviours on or off.

use std::io::IsTerminal;

/// candle asks for the thread count on every parallel op, and without RAYON_NUM_THREADS it
/// re-reads the CPU/cgroup files each time; resolve it once, before any thread starts.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Training frees and reallocates the same activation-sized buffers every step. glibc returns
/// blocks over its dynamic mmap threshold to the OS and faults fresh zeroed pages back in on
/// the next step; raising the threshold to its maximum (32 MiB) and not trimming the heap keeps
/// them for reuse (about 5% faster on the CPU benchmark, same peak RSS).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORPO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: logs redirected to a file or a pipe stay plain text.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_target(false)
        // A closed stderr loses the logs, not the run: tracing would report the failed
        // write with `eprintln!`, which panics.
        .log_internal_errors(false)
        .init();
}

/// An on/off `ORPO_*` switch: the variable, the value that flips it, what it does, the log line.
type Switch = (&'static str, &'static str, fn(), &'static str);

const SWITCHES: [Switch; 6] = [
    (
        "ORPO_FUSED_KERNELS",
        "0",
        || orpo::ops::set_fused_kernels(false),
        "CPU kernels off, plain candle ops throughout",
    ),
    (
        "ORPO_CUDA_KERNELS",
        "0",
        || orpo::ops::set_cuda_kernels(false),
        "the project's CUDA kernels off, candle ops instead",
    ),
    (
        "ORPO_FUSED_ATTENTION",
        "1",
        || orpo::ops::set_fused_attention(true),
        "attention's probabilities as one fused op",
    ),
    (
        "ORPO_RECOMPUTE_ATTENTION",
        "0",
        || orpo::model::set_recompute_attention_probs(false),
        "attention's probabilities keep their chain for backward",
    ),
    (
        "ORPO_CUDA_EVENTS",
        "1",
        || orpo::device::set_cuda_events(true),
        "cudarc's per-allocation stream events kept",
    ),
    (
        "ORPO_KEEP_GPU_MEMORY",
        "0",
        || orpo::memory::set_keep_freed_device_memory(false),
        "the GPU's memory pool returns freed memory at each sync",
    ),
];

/// The `ORPO_*` environment switches (README: Performance, Memory), each said in the log.
pub fn apply_switches() {
    for (name, value, apply, effect) in SWITCHES {
        if std::env::var_os(name).is_some_and(|v| v == value) {
            apply();
            tracing::info!("{name}={value}: {effect}");
        }
    }
    if let Some(v) = std::env::var_os("ORPO_ATTENTION_GROUPS") {
        match v
            .to_str()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= 1)
        {
            Some(n) => {
                orpo::model::set_max_attention_groups(n);
                tracing::info!("ORPO_ATTENTION_GROUPS={n}: at most {n} batched attention calls");
            }
            None => tracing::warn!("ORPO_ATTENTION_GROUPS={v:?} ignored: expected a count >= 1"),
        }
    }
}

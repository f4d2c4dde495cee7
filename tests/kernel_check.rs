//! `orpo check-kernels` on the CPU: every op's CPU kernel and its plain candle-op path agree
//! with the f64 reference (the same harness the GPU check runs on CUDA).

use candle_core::Device;
use orpo::kernel_check::{run, Mode};

#[test]
fn every_kernel_check_passes_on_the_cpu() {
    let mut streamed = 0;
    let outcomes = run(&Device::Cpu, None, |_| streamed += 1);
    assert_eq!(streamed, outcomes.len());
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| format!("{o:?}"))
        .collect();
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
    // Both modes, every op of the list, each with its output compared.
    for mode in [Mode::Kernels, Mode::Plain] {
        let ops: std::collections::BTreeSet<&str> = outcomes
            .iter()
            .filter(|o| o.mode == mode && o.errors.iter().any(|(k, _)| k == "out"))
            .map(|o| o.op)
            .collect();
        assert_eq!(ops.len(), 20, "{mode:?}: {ops:?}");
    }
    // Gradients compared wherever an input is trained (all but the forward-only ops).
    let graded = outcomes
        .iter()
        .filter(|o| o.errors.iter().any(|(k, _)| k.starts_with("d_")))
        .count();
    assert_eq!(graded, outcomes.len() - 2 * 8);
}

/// A result off by more than the tolerance fails, and `--only` selects by name.
#[test]
fn a_filter_selects_and_the_verdict_reads_the_errors() {
    let outcomes = run(&Device::Cpu, Some("swiglu"), |_| ());
    assert_eq!(outcomes.len(), 8);
    let mut o = outcomes[0].clone();
    assert!(o.passed());
    o.errors.push(("d_extra".into(), 2.0 * o.tolerance));
    assert!(!o.passed());
    o.errors.pop();
    o.errors.push(("d_extra".into(), f64::NAN));
    assert!(!o.passed() && o.worst().is_nan());
    assert!(run(&Device::Cpu, Some("no-such-op"), |_| ()).is_empty());
}

/// The command: a table line per check and exit 0 when all pass; a filter matching nothing, or
/// a device that does not exist, is an input error (exit 2) naming the flag.
#[test]
fn the_command_reports_each_check_and_exits_by_the_verdict() {
    let orpo = env!("CARGO_BIN_EXE_orpo");
    let out = std::process::Command::new(orpo)
        .args(["check-kernels", "--device", "cpu", "--only", "rotary"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("PASS  rotary"))
            .count(),
        4
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 of 4 kernel checks passed"));
    let json = std::process::Command::new(orpo)
        .args([
            "check-kernels",
            "--device",
            "cpu",
            "--only",
            "relu",
            "--json",
        ])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r["passed"] == true && r["errors"]["d_x"].is_number()));
    let none = std::process::Command::new(orpo)
        .args(["check-kernels", "--device", "cpu", "--only", "no-such-op"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("matches no op"));
    let bad = std::process::Command::new(orpo)
        .args(["check-kernels", "--device", "tpu"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("--device: `tpu` is not one of"), "{msg}");
}

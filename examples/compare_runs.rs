//! Compares two `orpo train` output folders number by number, for device parity checks (CUDA
//! against CPU, bf16 on one device against bf16 on another):
//!
//! ```text
//! compare_runs RUN_A RUN_B [--rtol 1e-4] [--atol 1e-6] [--tensor-rtol 1e-4]
//!              [--key-tol KEY=RTOL[,ATOL]]... [--skip-tensor SUBSTRING]... [--json OUT.json]
//! ```
//!
//! - `metrics.jsonl`: the same number of lines; every key of every line but the timings
//!   (`elapsed_s`, `eval_runtime`, `eval_*_per_second`):
//!   numbers agree when `|a - b| <= atol + rtol * max(|a|, |b|)` (per-key tolerances with
//!   `--key-tol`, where KEY may end in `*` to match a prefix), anything else must be equal.
//! - `eval_metrics.json`: the same, when either run has one.
//! - `model.safetensors` or `adapter_model.safetensors`: the same tensor names, shapes and
//!   dtypes; each tensor's relative difference `‖a − b‖ / max(‖a‖, ‖b‖)` (in f64, after
//!   conversion to f32) must be at most `--tensor-rtol`; `--skip-tensor` leaves tensors whose
//!   name contains the substring out of the verdict (still printed), e.g. `k_proj.bias`, whose
//!   gradient is zero in exact arithmetic, so its AdamW updates are rounding noise in both runs.
//!
//! - `--base DIR`: a run holding the weights both runs started from (e.g. the same config with
//!   `optim.lr=0`). Tensors are then compared by their updates `a − base` and `b − base`:
//!   `‖a − b‖ / max(‖a − base‖, ‖b − base‖)` against `--tensor-rtol`, and the updates' norms,
//!   `|‖a − base‖ − ‖b − base‖| / ‖a − base‖`, against `--norm-rtol`; tensors whose update norm
//!   is under `--min-update` are left out. With one AdamW step at `lr = adam_epsilon = 1e4`,
//!   no weight decay and no clipping, the update is the gradient (`lr·g / (|g| + eps)`), so this
//!   compares every parameter's gradient, and its norm, between the runs.
//! - `--skip-eval` ignores `eval_metrics.json`.
//!
//! Prints each key's largest absolute and relative difference, the tensors that differ most,
//! and PASS or FAIL; exits 0 on PASS, 1 on FAIL, 2 on unreadable or mismatched runs. `--json`
//! writes the same summary as one JSON object.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    about = "Compare two orpo run folders (metrics, eval metrics, saved tensors)",
    args_override_self = true
)]
struct Args {
    /// The reference run folder (e.g. the CPU run).
    a: PathBuf,
    /// The run folder to check against it (e.g. the CUDA run).
    b: PathBuf,
    /// Relative tolerance of every metric without a --key-tol.
    #[arg(long, default_value_t = 1e-4)]
    rtol: f64,
    /// Absolute tolerance of every metric without a --key-tol.
    #[arg(long, default_value_t = 1e-6)]
    atol: f64,
    /// Largest relative difference ‖a − b‖ / max(‖a‖, ‖b‖) of any saved tensor.
    #[arg(long, default_value_t = 1e-4)]
    tensor_rtol: f64,
    /// KEY=RTOL or KEY=RTOL,ATOL for one metric (KEY may end in `*`); repeatable.
    #[arg(long = "key-tol")]
    key_tol: Vec<String>,
    /// Leave tensors whose name contains this out of the verdict; repeatable.
    #[arg(long = "skip-tensor")]
    skip_tensor: Vec<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The run both started from: compare tensor updates (see above).
    #[arg(long)]
    base: Option<PathBuf>,
    /// With --base: largest relative difference of a tensor's update norm.
    #[arg(long, default_value_t = f64::INFINITY)]
    norm_rtol: f64,
    /// With --base: tensors whose update norm is under this are left out of the verdict.
    #[arg(long, default_value_t = 1e-6)]
    min_update: f64,
    /// Ignore eval_metrics.json.
    #[arg(long)]
    skip_eval: bool,
    /// How many of the most different tensors to print.
    #[arg(long, default_value_t = 5)]
    show: usize,
}

struct Tolerances {
    rtol: f64,
    atol: f64,
    keys: Vec<(String, f64, f64)>,
}

impl Tolerances {
    fn of(&self, key: &str) -> (f64, f64) {
        // Exact names first, then the longest matching prefix.
        if let Some((_, r, a)) = self.keys.iter().find(|(k, _, _)| k == key) {
            return (*r, *a);
        }
        self.keys
            .iter()
            .filter(|(k, _, _)| k.ends_with('*') && key.starts_with(&k[..k.len() - 1]))
            .max_by_key(|(k, _, _)| k.len())
            .map_or((self.rtol, self.atol), |(_, r, a)| (*r, *a))
    }
}

#[derive(Default)]
struct KeyStat {
    max_abs: f64,
    max_rel: f64,
    worst_at: String,
    failures: usize,
    compared: usize,
    tol: (f64, f64),
}

fn rel(a: f64, b: f64) -> f64 {
    let scale = a.abs().max(b.abs());
    if scale == 0.0 {
        0.0
    } else {
        (a - b).abs() / scale
    }
}

/// Compares two flat JSON objects key by key into `stats` (keys prefixed by `prefix`).
/// Wall-clock keys, which no two runs share.
fn is_timing(key: &str) -> bool {
    key == "elapsed_s" || key == "eval_runtime" || key.ends_with("_per_second")
}

fn compare_objects(
    a: &Value,
    b: &Value,
    at: &str,
    prefix: &str,
    tol: &Tolerances,
    stats: &mut BTreeMap<String, KeyStat>,
    problems: &mut Vec<String>,
) {
    let (Some(oa), Some(ob)) = (a.as_object(), b.as_object()) else {
        problems.push(format!("{at}: not JSON objects"));
        return;
    };
    let keys: BTreeSet<&String> = oa.keys().chain(ob.keys()).collect();
    for k in keys {
        if is_timing(k) {
            continue;
        }
        let name = format!("{prefix}{k}");
        let (va, vb) = match (oa.get(k), ob.get(k)) {
            (Some(x), Some(y)) => (x, y),
            _ => {
                problems.push(format!("{at}: key `{k}` is in only one run"));
                continue;
            }
        };
        let st = stats.entry(name.clone()).or_default();
        st.tol = tol.of(k);
        st.compared += 1;
        match (va.as_f64(), vb.as_f64()) {
            (Some(x), Some(y)) => {
                let d = (x - y).abs();
                let r = rel(x, y);
                // Written so that NaN fails.
                let within = d <= st.tol.1 + st.tol.0 * x.abs().max(y.abs());
                if !within {
                    st.failures += 1;
                }
                if st.worst_at.is_empty() || r > st.max_rel {
                    st.worst_at = format!("{at} ({x} vs {y})");
                }
                st.max_abs = st.max_abs.max(d);
                st.max_rel = st.max_rel.max(r);
            }
            _ => {
                if va != vb {
                    st.failures += 1;
                    st.max_rel = f64::INFINITY;
                    st.worst_at = format!("{at} ({va} vs {vb})");
                }
            }
        }
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn tensor_file(dir: &Path) -> Option<PathBuf> {
    ["model.safetensors", "adapter_model.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

fn norm_f64(t: &Tensor) -> Result<f64> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt())
}

struct TensorStat {
    name: String,
    /// ‖a − b‖ / max(‖a‖, ‖b‖), or with a base, over the larger update norm.
    rel: f64,
    max_abs: f64,
    /// ‖a‖, or with a base, ‖a − base‖.
    norm: f64,
    /// With a base: the update norms' relative difference.
    norm_rel: f64,
    skipped: bool,
}

fn load_tensors(f: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(f, &Device::Cpu)
        .with_context(|| format!("loading {}", f.display()))
}

fn compare_tensors(
    fa: &Path,
    fb: &Path,
    base: Option<&Path>,
    min_update: f64,
    skip: &[String],
    problems: &mut Vec<String>,
) -> Result<Vec<TensorStat>> {
    let ta = load_tensors(fa)?;
    let tb = load_tensors(fb)?;
    let t0 = base.map(load_tensors).transpose()?;
    let names: BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let (Some(x), Some(y)) = (ta.get(name), tb.get(name)) else {
            problems.push(format!("tensor `{name}` is in only one run"));
            continue;
        };
        if x.dims() != y.dims() || x.dtype() != y.dtype() {
            problems.push(format!(
                "tensor `{name}`: {:?} {:?} vs {:?} {:?}",
                x.dims(),
                x.dtype(),
                y.dims(),
                y.dtype()
            ));
            continue;
        }
        let (mut x, mut y) = (x.to_dtype(DType::F32)?, y.to_dtype(DType::F32)?);
        let mut tiny = false;
        if let Some(t0) = &t0 {
            let Some(w0) = t0.get(name) else {
                problems.push(format!("tensor `{name}` is not in the base run"));
                continue;
            };
            let w0 = w0.to_dtype(DType::F32)?;
            x = (x - &w0)?;
            y = (y - &w0)?;
        }
        let diff = (&x - &y)?;
        let (nx, ny, nd) = (norm_f64(&x)?, norm_f64(&y)?, norm_f64(&diff)?);
        let max_abs = diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
        let scale = nx.max(ny);
        if t0.is_some() && scale < min_update {
            tiny = true;
        }
        out.push(TensorStat {
            name: name.clone(),
            rel: if scale == 0.0 { 0.0 } else { nd / scale },
            max_abs,
            norm: nx,
            norm_rel: if t0.is_some() && nx > 0.0 {
                (nx - ny).abs() / nx
            } else {
                0.0
            },
            skipped: tiny || skip.iter().any(|s| name.contains(s.as_str())),
        });
    }
    Ok(out)
}

fn run(args: &Args) -> Result<bool> {
    let mut keys = Vec::new();
    for kt in &args.key_tol {
        let (k, v) = kt
            .split_once('=')
            .with_context(|| format!("--key-tol `{kt}`: expected KEY=RTOL[,ATOL]"))?;
        let (r, a) = match v.split_once(',') {
            Some((r, a)) => (r.parse::<f64>()?, a.parse::<f64>()?),
            None => (v.parse::<f64>()?, args.atol),
        };
        keys.push((k.to_string(), r, a));
    }
    let tol = Tolerances {
        rtol: args.rtol,
        atol: args.atol,
        keys,
    };
    let mut problems = Vec::new();
    let mut stats: BTreeMap<String, KeyStat> = BTreeMap::new();

    let (ma, mb) = (
        read_jsonl(&args.a.join("metrics.jsonl"))?,
        read_jsonl(&args.b.join("metrics.jsonl"))?,
    );
    if ma.is_empty() {
        bail!("{}: metrics.jsonl is empty", args.a.display());
    }
    if ma.len() != mb.len() {
        problems.push(format!("metrics.jsonl: {} lines vs {}", ma.len(), mb.len()));
    }
    for (i, (a, b)) in ma.iter().zip(&mb).enumerate() {
        let at = format!(
            "line {} (step {})",
            i + 1,
            a.get("step").unwrap_or(&Value::Null)
        );
        compare_objects(a, b, &at, "", &tol, &mut stats, &mut problems);
    }
    let (ea, eb) = (
        args.a.join("eval_metrics.json"),
        args.b.join("eval_metrics.json"),
    );
    match (
        ea.is_file() && !args.skip_eval,
        eb.is_file() && !args.skip_eval,
    ) {
        (true, true) => {
            let read = |p: &Path| -> Result<Value> {
                serde_json::from_str(&std::fs::read_to_string(p)?)
                    .with_context(|| format!("parsing {}", p.display()))
            };
            compare_objects(
                &read(&ea)?,
                &read(&eb)?,
                "eval_metrics.json",
                "eval:",
                &tol,
                &mut stats,
                &mut problems,
            );
        }
        (false, false) => {}
        _ => problems.push("eval_metrics.json is in only one run".into()),
    }

    let mut tensors = Vec::new();
    match (tensor_file(&args.a), tensor_file(&args.b)) {
        (Some(fa), Some(fb)) => {
            if fa.file_name() != fb.file_name() {
                problems.push(format!(
                    "tensor files differ: {} vs {}",
                    fa.display(),
                    fb.display()
                ));
            } else {
                let base = match &args.base {
                    Some(d) => Some(
                        d.join(fa.file_name().unwrap())
                            .canonicalize()
                            .with_context(|| {
                                format!("no {:?} in {}", fa.file_name().unwrap(), d.display())
                            })?,
                    ),
                    None => None,
                };
                tensors = compare_tensors(
                    &fa,
                    &fb,
                    base.as_deref(),
                    args.min_update,
                    &args.skip_tensor,
                    &mut problems,
                )?;
            }
        }
        (None, None) => problems.push("no model.safetensors or adapter_model.safetensors".into()),
        _ => problems.push("a tensor file is in only one run".into()),
    }

    // Report.
    println!("compare {} vs {}", args.a.display(), args.b.display());
    println!(
        "{:<28} {:>11} {:>11} {:>9} {:>5}  worst at",
        "metric", "max |a-b|", "max rel", "rtol", "fail"
    );
    let mut metric_fail = 0;
    for (k, s) in &stats {
        metric_fail += s.failures;
        println!(
            "{:<28} {:>11.3e} {:>11.3e} {:>9.1e} {:>5}  {}",
            k, s.max_abs, s.max_rel, s.tol.0, s.failures, s.worst_at
        );
    }
    let mut sorted: Vec<&TensorStat> = tensors.iter().collect();
    sorted.sort_by(|x, y| y.rel.total_cmp(&x.rel));
    let tensor_fail = tensors
        .iter()
        .filter(|t| {
            // Written so that NaN fails.
            let within = t.rel <= args.tensor_rtol && t.norm_rel <= args.norm_rtol;
            !t.skipped && !within
        })
        .count();
    let worst_kept = sorted.iter().find(|t| !t.skipped);
    let worst_norm = tensors
        .iter()
        .filter(|t| !t.skipped && args.base.is_some())
        .max_by(|x, y| x.norm_rel.total_cmp(&y.norm_rel));
    let what = if args.base.is_some() {
        "update"
    } else {
        "tensor"
    };
    println!(
        "tensors: {} compared ({}s), {} over tensor-rtol {:.1e}{}{}",
        tensors.len(),
        what,
        tensor_fail,
        args.tensor_rtol,
        worst_kept.map_or(String::new(), |t| format!(
            ", worst counted: {} rel {:.3e}",
            t.name, t.rel
        )),
        match (args.base.is_some(), worst_norm) {
            (true, Some(t)) => format!(
                "; update norms: worst {} rel {:.3e} (norm-rtol {:.1e}), {} left out as tiny or skipped",
                t.name,
                t.norm_rel,
                args.norm_rtol,
                tensors.iter().filter(|t| t.skipped).count()
            ),
            _ => String::new(),
        }
    );
    for t in sorted.iter().take(args.show) {
        println!(
            "  {:<48} rel {:.3e}  max|a-b| {:.3e}  |a| {:.3e}  norm rel {:.3e}{}",
            t.name,
            t.rel,
            t.max_abs,
            t.norm,
            t.norm_rel,
            if t.skipped { "  (skipped)" } else { "" }
        );
    }
    for p in &problems {
        println!("problem: {p}");
    }
    let pass = problems.is_empty() && metric_fail == 0 && tensor_fail == 0;
    println!("{}", if pass { "PASS" } else { "FAIL" });

    if let Some(path) = &args.json {
        let max_over =
            |f: &dyn Fn(&KeyStat) -> f64| -> f64 { stats.values().map(f).fold(0.0, f64::max) };
        let summary = json!({
            "a": args.a, "b": args.b, "pass": pass,
            "metric_failures": metric_fail,
            "tensor_failures": tensor_fail,
            "problems": problems,
            "max_metric_rel": max_over(&|s| if s.max_rel.is_finite() { s.max_rel } else { f64::MAX }),
            "metrics": stats.iter().map(|(k, s)| (k.clone(), json!({
                "max_abs": s.max_abs,
                "max_rel": if s.max_rel.is_finite() { json!(s.max_rel) } else { json!("inf") },
                "rtol": s.tol.0, "atol": s.tol.1,
                "failures": s.failures, "compared": s.compared, "worst_at": s.worst_at,
            }))).collect::<serde_json::Map<_, _>>(),
            "tensors_compared": tensors.len(),
            "compared_updates": args.base.is_some(),
            "norm_rtol": if args.norm_rtol.is_finite() { json!(args.norm_rtol) } else { json!(null) },
            "max_update_norm_rel": worst_norm.map(|t| t.norm_rel),
            "worst_update_norm": worst_norm.map(|t| t.name.clone()),
            "tensor_rtol": args.tensor_rtol,
            "max_tensor_rel": worst_kept.map_or(0.0, |t| t.rel),
            "worst_tensor": worst_kept.map(|t| t.name.clone()),
            "max_tensor_rel_incl_skipped": sorted.first().map_or(0.0, |t| t.rel),
            "worst_tensors": sorted.iter().take(args.show).map(|t| json!({
                "name": t.name, "rel": t.rel, "max_abs": t.max_abs, "norm": t.norm,
                "norm_rel": t.norm_rel, "skipped": t.skipped,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(pass)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("compare_runs: {e:#}");
            if let Some(path) = &args.json {
                let _ = std::fs::write(
                    path,
                    json!({"a": args.a, "b": args.b, "pass": false, "error": format!("{e:#}")})
                        .to_string(),
                );
            }
            ExitCode::from(2)
        }
    }
}

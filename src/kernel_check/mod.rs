//! `orpo check-kernels`: every op that runs a kernel of the project's own (CUDA or CPU), on a
//! device, forward and backward, on seeded inputs, against the same op in f64 on the CPU
//! through plain candle ops.
//!
//! A training run that disagrees with the CPU says only that something is off; this says which
//! op, dtype and shape, and whether candle's ops on the same device (`plain`: the project's
//! kernels off, as `ORPO_CUDA_KERNELS=0` / `ORPO_FUSED_KERNELS=0`) agree. Each check's error is
//! the largest absolute difference over the largest magnitude of the reference, for the
//! output and for every input's gradient; a gradient that does not arrive fails the check
//! (the candle trap: ops without a backward drop it silently).

mod cases;

use candle_core::{DType, Device, Result, Tensor, Var};

/// Whether the project's kernels were on for a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The project's kernels (CUDA's, or the CPU's fused ops).
    Kernels,
    /// The plain candle-op path the kernels replace.
    Plain,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kernels => "kernels",
            Mode::Plain => "plain",
        }
    }
}

/// One op, dtype, shape and mode.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub op: &'static str,
    pub dtype: DType,
    pub shape: String,
    pub mode: Mode,
    /// `("out", e)` and `("d_NAME", e)` for each input with a gradient.
    pub errors: Vec<(String, f64)>,
    pub tolerance: f64,
    /// Why the check could not compare (an error from the op, a missing gradient).
    pub failure: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
            && self
                .errors
                .iter()
                .all(|(_, e)| e.is_finite() && *e <= self.tolerance)
    }

    /// The largest error (NaN when one is NaN).
    pub fn worst(&self) -> f64 {
        self.errors.iter().map(|(_, e)| *e).fold(0.0, |a, e| {
            if e.is_nan() || a.is_nan() {
                f64::NAN
            } else {
                a.max(e)
            }
        })
    }

    /// One JSON object (the `--json` output's lines).
    pub fn to_json(&self) -> serde_json::Value {
        let errors: serde_json::Map<String, serde_json::Value> = self
            .errors
            .iter()
            .map(|(k, e)| (k.clone(), serde_json::json!(finite_or_null(*e))))
            .collect();
        serde_json::json!({
            "op": self.op,
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "shape": self.shape,
            "mode": self.mode.name(),
            "errors": errors,
            "tolerance": self.tolerance,
            "passed": self.passed(),
            "failure": self.failure,
        })
    }
}

fn finite_or_null(e: f64) -> Option<f64> {
    e.is_finite().then_some(e)
}

/// Runs every check whose op name contains `only` (all when `None`) on `device`, with the
/// project's kernels on and then off, handing each outcome to `done` as it comes (a device
/// fault that ends the process leaves the ones before it reported). The kernel switches are
/// restored afterwards.
pub fn run(device: &Device, only: Option<&str>, mut done: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let saved = (crate::ops::cuda_kernels(), crate::ops::fused_kernels());
    let mut out = Vec::new();
    for mode in [Mode::Kernels, Mode::Plain] {
        set_mode(device, mode, saved);
        for case in cases::all() {
            if only.is_some_and(|o| !case.op.contains(o)) {
                continue;
            }
            let outcome = check(&case, device, mode);
            done(&outcome);
            out.push(outcome);
        }
    }
    crate::ops::set_cuda_kernels(saved.0);
    crate::ops::set_fused_kernels(saved.1);
    out
}

fn set_mode(device: &Device, mode: Mode, saved: (bool, bool)) {
    let on = mode == Mode::Kernels;
    if device.is_cuda() {
        crate::ops::set_cuda_kernels(on);
        crate::ops::set_fused_kernels(saved.1);
    } else {
        crate::ops::set_cuda_kernels(saved.0);
        crate::ops::set_fused_kernels(on);
    }
}

/// An op under test: `run` on the device's tensors, `reference` (default: `run`) on their f64
/// CPU copies.
pub(crate) type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

pub(crate) enum Values {
    Float(Vec<f32>),
    Ids(Vec<u32>),
}

pub(crate) struct Input {
    pub name: &'static str,
    pub shape: Vec<usize>,
    /// The dtype on the device (floats; ids are u32).
    pub dtype: DType,
    pub values: Values,
    pub grad: bool,
}

pub(crate) struct Case {
    pub op: &'static str,
    pub dtype: DType,
    pub shape: String,
    pub inputs: Vec<Input>,
    pub run: OpFn,
    pub reference: Option<OpFn>,
    /// Weights of the outputs in the loss whose gradients are compared (default: seeded
    /// values in [-1, 1)); zero where an output must carry no gradient.
    pub weights: Option<Vec<f32>>,
    pub tolerance: f64,
}

/// What one evaluation gives: the output and each graded input's gradient, on the host.
struct Evaluated {
    out: Vec<f64>,
    grads: Vec<(&'static str, Option<Vec<f64>>)>,
}

fn check(case: &Case, device: &Device, mode: Mode) -> Outcome {
    let mut outcome = Outcome {
        op: case.op,
        dtype: case.dtype,
        shape: case.shape.clone(),
        mode,
        errors: Vec::new(),
        tolerance: case.tolerance,
        failure: None,
    };
    let compared = (|| -> Result<Vec<(String, f64)>> {
        let on_device = evaluate(case, device, false)?;
        let reference = evaluate(case, &Device::Cpu, true)?;
        let mut errors = vec![(
            "out".to_string(),
            relative_error(&on_device.out, &reference.out)?,
        )];
        for ((name, got), (_, want)) in on_device.grads.iter().zip(&reference.grads) {
            let (Some(got), Some(want)) = (got, want) else {
                candle_core::bail!("no gradient reached {name}");
            };
            errors.push((format!("d_{name}"), relative_error(got, want)?));
        }
        Ok(errors)
    })();
    match compared {
        Ok(errors) => outcome.errors = errors,
        Err(e) => outcome.failure = Some(e.to_string()),
    }
    outcome
}

/// `max |a - b| / max |b|` (the absolute difference when `b` is all zeros); NaN anywhere in
/// `a` gives NaN.
fn relative_error(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() {
        candle_core::bail!("{} values against the reference's {}", a.len(), b.len());
    }
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() {
            return Ok(f64::NAN);
        }
        diff = diff.max((x - y).abs());
        scale = scale.max(y.abs());
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

fn evaluate(case: &Case, device: &Device, reference: bool) -> Result<Evaluated> {
    let mut tensors = Vec::with_capacity(case.inputs.len());
    let mut vars = Vec::new();
    for input in &case.inputs {
        let t = match &input.values {
            // Rounded on the host, so the device and the reference see the same values.
            Values::Float(v) => {
                let t = Tensor::from_slice(v, input.shape.as_slice(), &Device::Cpu)?
                    .to_dtype(input.dtype)?;
                if reference {
                    t.to_dtype(DType::F64)?
                } else {
                    t.to_device(device)?
                }
            }
            Values::Ids(v) => Tensor::from_slice(v, input.shape.as_slice(), device)?,
        };
        if input.grad {
            let var = Var::from_tensor(&t)?;
            tensors.push(var.as_tensor().clone());
            vars.push((input.name, var));
        } else {
            tensors.push(t);
        }
    }
    let op = match (&case.reference, reference) {
        (Some(r), true) => r,
        _ => &case.run,
    };
    let y = op(&tensors)?;
    let out = host_f64(&y)?;
    let mut grads = Vec::new();
    if !vars.is_empty() {
        let wdtype = if reference { DType::F64 } else { DType::F32 };
        let w = match &case.weights {
            Some(w) => w.clone(),
            None => cases::Rng::new(0x5eed ^ out.len() as u64).values(out.len(), 1.0),
        };
        let w = Tensor::from_vec(w, y.shape(), &Device::Cpu)?
            .to_dtype(wdtype)?
            .to_device(y.device())?;
        let loss = (y.to_dtype(wdtype)? * w)?.sum_all()?;
        let store = loss.backward()?;
        for (name, var) in &vars {
            grads.push((*name, store.get(var.as_tensor()).map(host_f64).transpose()?));
        }
    }
    Ok(Evaluated { out, grads })
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()
}

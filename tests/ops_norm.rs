//! The fused norms in `orpo::ops` against the plain candle-op chains they replace: forward
//! values and gradients (x, w, b) on random inputs, accuracy against an f64 evaluation, a
//! finite-difference check, and (ignored by default) timings.
//!
//! Timings: `cargo test --release --test ops_norm -- --ignored --nocapture`.

use candle_core::{DType, Device, Result, Tensor, Var};
use orpo::ops::{layer_norm, layer_norm_chain, rms_norm, rms_norm_bwd_ops, rms_norm_chain};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

const EPS: f64 = 1e-5;

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32, shift: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let u: f32 = rng.gen_range(1e-7..1.0);
            let v: f32 = rng.gen();
            shift + scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32, shift: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(randn(rng, n, scale, shift), shape, &Device::Cpu)
}

/// `max |a - b| / (atol + rtol * |b|)` must stay <= 1, with `atol = atol_rel * max |b|`;
/// NaN anywhere fails.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f32, atol_rel: f32) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let atol = atol_rel * scale;
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        assert!(
            !x.is_nan() && !y.is_nan(),
            "{what}: NaN at {i} ({x} vs {y})"
        );
        let tol = atol + rtol * y.abs();
        assert!(
            (x - y).abs() <= tol,
            "{what}: at {i}: {x} vs {y} (tol {tol})"
        );
    }
    Ok(())
}

/// Inputs of a norm call: `x`, and the optional weight and bias.
struct Inputs {
    x: Tensor,
    w: Option<Tensor>,
    b: Option<Tensor>,
}

type NormFn = dyn Fn(&Tensor, Option<&Tensor>, Option<&Tensor>) -> Result<Tensor>;

/// Value of `f(x, w, b)` and the gradients of `sum(f(x, w, b) * r)` for x, w and b (those given).
fn value_and_grads(
    inp: &Inputs,
    r: &Tensor,
    f: &NormFn,
) -> Result<(Tensor, Tensor, Option<Tensor>, Option<Tensor>)> {
    let x = Var::from_tensor(&inp.x)?;
    let w = inp.w.as_ref().map(Var::from_tensor).transpose()?;
    let b = inp.b.as_ref().map(Var::from_tensor).transpose()?;
    let y = f(
        x.as_tensor(),
        w.as_ref().map(|v| v.as_tensor()),
        b.as_ref().map(|v| v.as_tensor()),
    )?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let get = |v: &Var| grads.get(v.as_tensor()).cloned();
    // x and w always get a gradient; b only where it is used (RMS norm takes none).
    let gb = b.as_ref().and_then(get);
    Ok((
        y.detach(),
        get(&x).expect("dx"),
        w.as_ref().map(|w| get(w).expect("dw")),
        gb,
    ))
}

fn fused_ln(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Result<Tensor> {
    layer_norm(x, w, b, EPS)
}
fn chain_ln(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Result<Tensor> {
    layer_norm_chain(x, w, b, EPS)
}
fn fused_rms(x: &Tensor, w: Option<&Tensor>, _: Option<&Tensor>) -> Result<Tensor> {
    rms_norm(x, w.expect("weight"), EPS)
}
fn chain_rms(x: &Tensor, w: Option<&Tensor>, _: Option<&Tensor>) -> Result<Tensor> {
    rms_norm_chain(x, w.expect("weight"), EPS)
}

/// Fused vs chain values and all gradients.
fn compare(what: &str, inp: &Inputs, r: &Tensor, fused: &NormFn, chain: &NormFn) -> Result<()> {
    let (y, gx, gw, gb) = value_and_grads(inp, r, fused)?;
    let (y0, gx0, gw0, gb0) = value_and_grads(inp, r, chain)?;
    assert_eq!(gb.is_some(), gb0.is_some(), "{what}: db presence");
    assert_close(&format!("{what} value"), &y, &y0, 1e-5, 1e-6)?;
    assert_close(&format!("{what} dx"), &gx, &gx0, 1e-5, 1e-5)?;
    if let (Some(a), Some(b)) = (gw, gw0) {
        assert_eq!(a.dims(), inp.w.as_ref().unwrap().dims());
        assert_close(&format!("{what} dw"), &a, &b, 1e-5, 1e-5)?;
    }
    if let (Some(a), Some(b)) = (gb, gb0) {
        assert_eq!(a.dims(), inp.b.as_ref().unwrap().dims());
        assert_close(&format!("{what} db"), &a, &b, 1e-5, 1e-5)?;
    }
    Ok(())
}

const SHAPES: [&[usize]; 3] = [&[3, 5], &[2, 7, 64], &[900, 768]];

#[test]
fn layer_norm_matches_chain_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for shape in SHAPES {
        let d = *shape.last().unwrap();
        let x = tensor(&mut rng, shape, 2.0, 0.7)?;
        let w = tensor(&mut rng, &[d], 0.3, 1.0)?;
        let b = tensor(&mut rng, &[d], 0.5, 0.0)?;
        let r = tensor(&mut rng, shape, 1.0, 0.0)?;
        for (with_w, with_b) in [(true, true), (true, false), (false, true), (false, false)] {
            let inp = Inputs {
                x: x.clone(),
                w: with_w.then(|| w.clone()),
                b: with_b.then(|| b.clone()),
            };
            let what = format!("layer_norm {shape:?} w={with_w} b={with_b}");
            compare(&what, &inp, &r, &fused_ln, &chain_ln)?;
        }
    }
    Ok(())
}

#[test]
fn rms_norm_matches_chain_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for shape in SHAPES {
        let d = *shape.last().unwrap();
        let inp = Inputs {
            x: tensor(&mut rng, shape, 2.0, 0.3)?,
            w: Some(tensor(&mut rng, &[d], 0.3, 1.0)?),
            b: None,
        };
        let r = tensor(&mut rng, shape, 1.0, 0.0)?;
        compare(
            &format!("rms_norm {shape:?}"),
            &inp,
            &r,
            &fused_rms,
            &chain_rms,
        )?;
    }
    Ok(())
}

/// RMS norm's backward in candle ops (what CUDA runs, and the CPU with its kernels off): the
/// chain's autograd gradients for x and a `[d]` or `[1, d]` weight, and no `dw` when not asked.
#[test]
fn rms_norm_ops_backward_matches_chain_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (shape, w_shape) in [
        (&[3usize, 5][..], &[5usize][..]),
        (&[2, 7, 64], &[1, 64]),
        (&[900, 768], &[768]),
    ] {
        let inp = Inputs {
            x: tensor(&mut rng, shape, 2.0, 0.3)?,
            w: Some(tensor(&mut rng, w_shape, 0.3, 1.0)?),
            b: None,
        };
        let r = tensor(&mut rng, shape, 1.0, 0.0)?;
        let w = inp.w.as_ref().unwrap();
        let (_, gx0, gw0, _) = value_and_grads(&inp, &r, &chain_rms)?;
        let (gx, gw) = rms_norm_bwd_ops(&inp.x, w, &r, EPS, true)?;
        let gw = gw.expect("dw");
        assert_eq!(gw.dims(), w.dims());
        assert_close(&format!("ops dx {shape:?}"), &gx, &gx0, 1e-5, 1e-5)?;
        assert_close(&format!("ops dw {shape:?}"), &gw, &gw0.unwrap(), 1e-5, 1e-5)?;
        assert!(rms_norm_bwd_ops(&inp.x, w, &r, EPS, false)?.1.is_none());
    }
    Ok(())
}

/// The fused f32 kernels against the chain evaluated in f64 (what an f32 reference such as
/// transformers' should agree with to ~1e-6).
#[test]
fn fused_is_accurate_against_f64() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (rows, d) = (64, 768);
    // A large offset relative to the spread stresses the variance computation.
    let x = tensor(&mut rng, &[rows, d], 0.5, 20.0)?;
    let w = tensor(&mut rng, &[d], 0.3, 1.0)?;
    let b = tensor(&mut rng, &[d], 0.5, 0.0)?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let y = layer_norm(&x, Some(&w), Some(&b), EPS)?;
    let y64 = layer_norm_chain(&f64s(&x)?, Some(&f64s(&w)?), Some(&f64s(&b)?), EPS)?;
    assert_close("layer_norm vs f64", &y, &y64, 1e-6, 1e-6)?;
    let y = rms_norm(&x, &w, EPS)?;
    let y64 = rms_norm_chain(&f64s(&x)?, &f64s(&w)?, EPS)?;
    assert_close("rms_norm vs f64", &y, &y64, 1e-6, 1e-6)?;
    Ok(())
}

#[test]
fn strided_inputs_frozen_params_and_fallback() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let d = 9;
    // A transposed (non-contiguous) input goes through an implicit copy, gradient included;
    // a `[1, d]` weight and bias are accepted too.
    let inp = Inputs {
        x: tensor(&mut rng, &[d, 6], 1.5, 0.2)?.t()?,
        w: Some(tensor(&mut rng, &[1, d], 0.3, 1.0)?),
        b: Some(tensor(&mut rng, &[1, d], 0.5, 0.0)?),
    };
    let r = tensor(&mut rng, &[6, d], 1.0, 0.0)?;
    compare("layer_norm strided", &inp, &r, &fused_ln, &chain_ln)?;
    compare("rms_norm strided", &inp, &r, &fused_rms, &chain_rms)?;

    // Frozen (non-Var) weight and bias: only x gets a gradient, and it is still right.
    let x = Var::from_tensor(&inp.x)?;
    let (w, b) = (inp.w.as_ref().unwrap(), inp.b.as_ref().unwrap());
    for fused in [true, false] {
        let f = if fused { layer_norm } else { layer_norm_chain };
        let y = f(x.as_tensor(), Some(w), Some(b), EPS)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        assert!(grads.get(w).is_none() && grads.get(b).is_none());
        let gx = grads.get(x.as_tensor()).expect("dx");
        if fused {
            let (_, gx0, _, _) = value_and_grads(&inp, &r, &chain_ln)?;
            assert_close("frozen params dx", gx, &gx0, 1e-5, 1e-5)?;
        }
    }

    // Other dtypes fall back to the chain (and keep their dtype); a scalar is an error.
    let x64 = inp.x.to_dtype(DType::F64)?;
    let w64 = w.to_dtype(DType::F64)?;
    let y = layer_norm(&x64, Some(&w64), None, EPS)?;
    assert_eq!(y.dtype(), DType::F64);
    assert_close(
        "f64 fallback",
        &y,
        &layer_norm(&inp.x, Some(w), None, EPS)?,
        1e-5,
        1e-6,
    )?;
    assert_eq!(rms_norm(&x64, &w64, EPS)?.dtype(), DType::F64);
    let s = Tensor::new(1f32, &Device::Cpu)?;
    assert!(layer_norm(&s, None, None, EPS).is_err());
    assert!(rms_norm(&s, &s, EPS).is_err());
    Ok(())
}

/// Central differences of `sum(f(x, w, b) * r)` in f32 for every entry of x, w and b, compared
/// with the fused analytic gradients.
fn finite_difference_check(what: &str, inp: &Inputs, r: &Tensor, f: &NormFn) -> Result<()> {
    let (_, gx, gw, gb) = value_and_grads(inp, r, f)?;
    let h = 1e-2f32;
    let r64 = r.to_dtype(DType::F64)?;
    let objective = |inp: &Inputs| -> Result<f64> {
        let y = f(&inp.x, inp.w.as_ref(), inp.b.as_ref())?.to_dtype(DType::F64)?;
        (y * &r64)?.sum_all()?.to_scalar::<f64>()
    };
    // Which input (0 = x, 1 = w, 2 = b) to perturb, and its analytic gradient.
    let targets = [(0, Some(gx)), (1, gw), (2, gb)];
    for (which, grad) in targets {
        let Some(grad) = grad else { continue };
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let base_t = [Some(&inp.x), inp.w.as_ref(), inp.b.as_ref()][which].unwrap();
        let base = base_t.flatten_all()?.to_vec1::<f32>()?;
        let with = |data: Vec<f32>| -> Result<Inputs> {
            let t = Tensor::from_vec(data, base_t.shape(), &Device::Cpu)?;
            let mut p = Inputs {
                x: inp.x.clone(),
                w: inp.w.clone(),
                b: inp.b.clone(),
            };
            match which {
                0 => p.x = t,
                1 => p.w = Some(t),
                _ => p.b = Some(t),
            }
            Ok(p)
        };
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let fd = (objective(&with(plus)?)? - objective(&with(minus)?)?) / (2.0 * h as f64);
            let err = (fd - grad[i] as f64).abs();
            assert!(
                err < 2e-3 * (1.0 + fd.abs()),
                "{what}: input {which} entry {i}: fd {fd} vs analytic {}",
                grad[i]
            );
        }
    }
    Ok(())
}

#[test]
fn finite_differences_tiny() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let inp = Inputs {
        x: tensor(&mut rng, &[2, 5], 1.0, 0.5)?,
        w: Some(tensor(&mut rng, &[5], 0.3, 1.0)?),
        b: Some(tensor(&mut rng, &[5], 0.5, 0.0)?),
    };
    let r = tensor(&mut rng, &[2, 5], 1.0, 0.0)?;
    finite_difference_check("layer_norm", &inp, &r, &fused_ln)?;
    finite_difference_check("rms_norm", &inp, &r, &fused_rms)
}

/// Seconds for the forward, and forward + backward, of `sum(f(x, w, b) * r)` (x, w, b as
/// variables).
fn fwd_bwd_once(inp: &Inputs, r: &Tensor, f: &NormFn) -> Result<(f64, f64)> {
    let x = Var::from_tensor(&inp.x)?;
    let w = inp.w.as_ref().map(Var::from_tensor).transpose()?;
    let b = inp.b.as_ref().map(Var::from_tensor).transpose()?;
    let t0 = Instant::now();
    let y = f(
        x.as_tensor(),
        w.as_ref().map(|v| v.as_tensor()),
        b.as_ref().map(|v| v.as_tensor()),
    )?;
    let tf = t0.elapsed().as_secs_f64();
    let grads = (&y * r)?.sum_all()?.backward()?;
    let t = t0.elapsed().as_secs_f64();
    assert!(grads.get(x.as_tensor()).is_some());
    Ok((tf, t))
}

/// Best and median of `xs`, in ms.
fn best_median_ms(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[0] * 1e3, xs[xs.len() / 2] * 1e3)
}

#[test]
#[ignore = "timing; run with --release -- --ignored --nocapture"]
fn timing_fused_vs_chain() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    println!("threads: {}", candle_core::utils::get_num_threads());
    let shape = [1000usize, 768];
    let inp = Inputs {
        x: tensor(&mut rng, &shape, 2.0, 0.5)?,
        w: Some(tensor(&mut rng, &[768], 0.3, 1.0)?),
        b: Some(tensor(&mut rng, &[768], 0.5, 0.0)?),
    };
    let r = tensor(&mut rng, &shape, 1.0, 0.0)?;
    let identity: &NormFn = &|x, _, _| x.affine(1.0, 0.0);
    let cases: [(&str, &NormFn, &NormFn); 2] = [
        ("layer_norm", &fused_ln, &chain_ln),
        ("rms_norm", &fused_rms, &chain_rms),
    ];
    let (warmup, reps) = (5, 40);
    for (name, fused, chain) in cases {
        // Interleaved so that machine noise hits all three alike; the identity op measures the
        // shared harness cost (loss, candle's gradient bookkeeping).
        let mut t: [(Vec<f64>, Vec<f64>); 3] = Default::default();
        for rep in 0..warmup + reps {
            for (k, f) in [fused, chain, identity].into_iter().enumerate() {
                let (tf, tt) = fwd_bwd_once(&inp, &r, f)?;
                if rep >= warmup {
                    t[k].0.push(tf);
                    t[k].1.push(tt);
                }
            }
        }
        let [(ff, ft), (cf, ct), (_, it)] = t.map(|(f, t)| (best_median_ms(f), best_median_ms(t)));
        println!(
            "{name} {shape:?} (best / median ms): harness {:.2} / {:.2} | fused fwd {:.2} / {:.2}, \
             fwd+bwd {:.2} / {:.2} | chain fwd {:.2} / {:.2}, fwd+bwd {:.2} / {:.2} | \
             fwd+bwd speed-up x{:.1} (median), excluding harness x{:.1}",
            it.0, it.1, ff.0, ff.1, ft.0, ft.1, cf.0, cf.1, ct.0, ct.1,
            ct.1 / ft.1,
            (ct.1 - it.1) / (ft.1 - it.1).max(1e-3),
        );
    }
    Ok(())
}

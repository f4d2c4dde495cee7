//! The fused `orpo::ops::linear` against the candle chain it replaces (`matmul(w.t())` +
//! `broadcast_add(b)`): values and gradients of x, w and b, frozen inputs, the fallback, and
//! (ignored by default) timings on the OPT-125M shapes.
//!
//! Timings: `cargo test --release --test ops_linear -- --ignored --nocapture`.

use candle_core::{DType, Device, Result, Tensor, Var};
use orpo::ops::{column_sums, linear, linear_chain};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| scale * rng.gen_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `max |a - b| <= atol + rtol * |b|` element-wise; NaN fails.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f32, atol: f32) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let tol = atol + rtol * y.abs();
        assert!(
            !x.is_nan() && (x - y).abs() <= tol,
            "{what}: at {i}: {x} vs {y}"
        );
    }
    Ok(())
}

type LinFn = fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// Value of `f(x, w, b)` and the gradients of `sum(f * r)` for the inputs that are variables.
fn run(
    f: LinFn,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: &Tensor,
    track: [bool; 3],
) -> Result<(Tensor, [Option<Tensor>; 3])> {
    let wrap = |t: &Tensor, on: bool| -> Result<(Tensor, Option<Var>)> {
        if on {
            let v = Var::from_tensor(t)?;
            Ok((v.as_tensor().clone(), Some(v)))
        } else {
            Ok((t.clone(), None))
        }
    };
    let (xt, xv) = wrap(x, track[0])?;
    let (wt, wv) = wrap(w, track[1])?;
    let (bt, bv) = match b {
        Some(b) => {
            let (t, v) = wrap(b, track[2])?;
            (Some(t), v)
        }
        None => (None, None),
    };
    let y = f(&xt, &wt, bt.as_ref())?;
    if !track.iter().any(|&t| t) {
        return Ok((y, [None, None, None]));
    }
    let grads = (&y * r)?.sum_all()?.backward()?;
    let get = |v: &Option<Var>| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned());
    Ok((y.detach(), [get(&xv), get(&wv), get(&bv)]))
}

#[test]
fn linear_matches_chain_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let cases: [(&[usize], usize); 5] = [
        (&[5], 3),
        (&[7, 16], 9),
        (&[2, 13, 33], 17),
        (&[3, 1, 4, 64], 48),
        (&[300, 96], 200),
    ];
    for (xs, out) in cases {
        let in_f = *xs.last().unwrap();
        let x = tensor(&mut rng, xs, 1.0)?;
        let w = tensor(&mut rng, &[out, in_f], 0.5)?;
        let b = tensor(&mut rng, &[out], 0.5)?;
        let mut ys = xs.to_vec();
        *ys.last_mut().unwrap() = out;
        let r = tensor(&mut rng, &ys, 1.0)?;
        for bias in [Some(&b), None] {
            for track in [[true; 3], [false, true, true], [true, false, false]] {
                let what = format!("{xs:?}x{out} bias={} track={track:?}", bias.is_some());
                let (y, g) = run(linear, &x, &w, bias, &r, track)?;
                let (y_ref, g_ref) = run(linear_chain, &x, &w, bias, &r, track)?;
                // Same gemm call and the same bias add: the forward is bitwise equal.
                assert_close(&format!("{what} value"), &y, &y_ref, 0.0, 0.0)?;
                for (k, (a, e)) in g.iter().zip(&g_ref).enumerate() {
                    match (a, e) {
                        (Some(a), Some(e)) => {
                            assert_close(&format!("{what} grad {k}"), a, e, 1e-5, 1e-5)?
                        }
                        (None, None) => {}
                        _ => panic!("{what}: gradient {k} present in only one of the two"),
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bias_grad_is_the_row_order_sum() -> Result<()> {
    // The column sums add rows in order in f32, exactly as candle's sum(0) does.
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (x, w, b) = (
        tensor(&mut rng, &[257, 40], 1.0)?,
        tensor(&mut rng, &[70, 40], 1.0)?,
        tensor(&mut rng, &[70], 1.0)?,
    );
    let r = tensor(&mut rng, &[257, 70], 100.0)?;
    let (_, g) = run(linear, &x, &w, Some(&b), &r, [false, false, true])?;
    let want = r.sum(0)?;
    assert_close("db", g[2].as_ref().unwrap(), &want, 0.0, 0.0)
}

#[test]
fn strided_input_fallback_and_errors() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let x = tensor(&mut rng, &[12, 6], 1.0)?.t()?; // [6, 12], not contiguous
    let w = tensor(&mut rng, &[5, 12], 1.0)?;
    let b = tensor(&mut rng, &[5], 1.0)?;
    let r = tensor(&mut rng, &[6, 5], 1.0)?;
    let (y, g) = run(linear, &x, &w, Some(&b), &r, [true; 3])?;
    let (y_ref, g_ref) = run(linear_chain, &x, &w, Some(&b), &r, [true; 3])?;
    assert_close("strided value", &y, &y_ref, 0.0, 0.0)?;
    for k in 0..3 {
        assert_close(
            "strided grad",
            g[k].as_ref().unwrap(),
            g_ref[k].as_ref().unwrap(),
            1e-5,
            1e-5,
        )?;
    }
    // Other dtypes take the chain.
    for dt in [DType::F64, DType::BF16] {
        let y = linear(&x.to_dtype(dt)?, &w.to_dtype(dt)?, Some(&b.to_dtype(dt)?))?;
        assert_eq!(y.dtype(), dt);
        assert_close("fallback", &y, &y_ref, 2e-2, 2e-2)?;
    }
    // Mismatched features are an error, not a panic.
    let bad = tensor(&mut rng, &[5, 11], 1.0)?;
    assert!(linear(&x, &bad, None).is_err());
    Ok(())
}

/// Best-of-`reps` forward and forward+backward seconds of `f` with all three inputs as variables.
fn time_fwd_bwd(f: LinFn, x: &Tensor, w: &Tensor, b: &Tensor, reps: usize) -> Result<(f64, f64)> {
    let (xv, wv, bv) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let (mut best_f, mut best_t) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t0 = Instant::now();
        let y = f(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()))?;
        let tf = t0.elapsed().as_secs_f64();
        let grads = y.sum_all()?.backward()?;
        // What the optimizer does with a weight gradient: read it contiguously.
        let gw = grads.get(wv.as_tensor()).unwrap().contiguous()?;
        let t = t0.elapsed().as_secs_f64();
        drop((gw, grads));
        best_f = best_f.min(tf);
        best_t = best_t.min(t);
    }
    Ok((best_f, best_t))
}

#[test]
#[ignore = "timing; run with --release -- --ignored --nocapture"]
fn timing_fused_vs_chain() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    println!("threads: {}", candle_core::utils::get_num_threads());
    for (rows, in_f, out) in [(845, 768, 768), (845, 768, 3072), (845, 3072, 768)] {
        let x = tensor(&mut rng, &[rows, in_f], 1.0)?;
        let w = tensor(&mut rng, &[out, in_f], 0.05)?;
        let b = tensor(&mut rng, &[out], 0.05)?;
        let (ff, ft) = time_fwd_bwd(linear, &x, &w, &b, 5)?;
        let (cf, ct) = time_fwd_bwd(linear_chain, &x, &w, &b, 5)?;
        println!(
            "linear [{rows}, {in_f}] -> {out}: fused fwd {:.1} ms, fwd+bwd {:.1} ms | chain fwd {:.1} ms, fwd+bwd {:.1} ms | x{:.2}",
            ff * 1e3, ft * 1e3, cf * 1e3, ct * 1e3, ct / ft
        );
    }
    Ok(())
}

/// `column_sums` (the parallel dim-0 reduce) gives candle's `sum(0)` on a tall, a wide and a
/// strided (transposed) matrix.
#[test]
fn column_sums_match_candle_sum0() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for shape in [[3001, 17], [5, 4099]] {
        let t = tensor(&mut rng, &shape, 1.0)?;
        assert_close("column sums", &column_sums(&t)?, &t.sum(0)?, 1e-5, 1e-5)?;
        let tt = t.t()?;
        assert_close("transposed", &column_sums(&tt)?, &tt.sum(0)?, 1e-5, 1e-5)?;
    }
    Ok(())
}

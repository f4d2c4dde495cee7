//! The fused ops in `orpo::ops` against the plain candle-op chains they replace: forward values
//! and gradients on random inputs, a finite-difference check, and (ignored by default) timings.
//!
//! Timings: `cargo test --release --test ops_grad -- --ignored --nocapture`.

use candle_core::{DType, Device, Result, Tensor, Var};
use orpo::ops::{softmax_last, softmax_last_chain, token_logprobs, token_logprobs_chain};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let u: f32 = rng.gen_range(1e-7..1.0);
            let v: f32 = rng.gen();
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// `max |a - b| / (atol + rtol * |b|)` must stay <= 1; NaN anywhere fails.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f32, atol: f32) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        assert!(
            !x.is_nan() && !y.is_nan(),
            "{what}: NaN at {i} ({x} vs {y})"
        );
        if x == y {
            continue; // also covers equal infinities
        }
        let tol = atol + rtol * y.abs();
        assert!(
            (x - y).abs() <= tol,
            "{what}: at {i}: {x} vs {y} (tol {tol})"
        );
    }
    Ok(())
}

/// Value of `f(x)` and the gradient of `sum(f(x) * w)` with respect to `x`.
fn value_and_grad(
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = (&y * w)?.sum_all()?.backward()?;
    let g = grads.get(var.as_tensor()).expect("gradient for x").clone();
    Ok((y.detach(), g))
}

/// Random scores of `shape`, about `masked` of each row set to -inf, at least one entry finite.
fn masked_scores(rng: &mut ChaCha8Rng, shape: &[usize], masked: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let cols = *shape.last().unwrap();
    let mut x = randn(rng, n, 3.0);
    for row in x.chunks_mut(cols) {
        let keep = rng.gen_range(0..cols);
        for (j, v) in row.iter_mut().enumerate() {
            if j != keep && rng.gen_bool(masked) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(x, shape, &Device::Cpu)
}

#[test]
fn softmax_matches_chain_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let shapes: [&[usize]; 5] = [
        &[7],
        &[3, 5],
        &[2, 3, 17],
        &[4, 1, 33, 33],
        &[2, 4, 64, 257],
    ];
    for (k, shape) in shapes.iter().enumerate() {
        let masked = [0.0, 0.3, 0.5, 0.9, 0.4][k];
        let x = masked_scores(&mut rng, shape, masked)?;
        let n = x.elem_count();
        let w = Tensor::from_vec(randn(&mut rng, n, 1.0), *shape, &Device::Cpu)?;
        let (y, gx) = value_and_grad(&x, &w, softmax_last)?;
        let (y_ref, gx_ref) = value_and_grad(&x, &w, softmax_last_chain)?;
        assert_close(&format!("softmax {shape:?} value"), &y, &y_ref, 1e-5, 1e-7)?;
        assert_close(&format!("softmax {shape:?} grad"), &gx, &gx_ref, 1e-5, 1e-6)?;
        // Masked entries: probability 0 and gradient exactly 0.
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ys = y.flatten_all()?.to_vec1::<f32>()?;
        let gs = gx.flatten_all()?.to_vec1::<f32>()?;
        for i in (0..n).filter(|&i| xs[i] == f32::NEG_INFINITY) {
            assert_eq!(
                (ys[i], gs[i]),
                (0.0, 0.0),
                "softmax {shape:?} masked entry {i}"
            );
        }
        // Rows sum to 1.
        let sums = y
            .sum(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    }
    Ok(())
}

/// The backward CUDA takes (`softmax_last_bwd_ops`: candle ops, row sums as products) equals
/// the CPU kernel's, on rows masked with `f32::MIN` as `AttnBias` masks them: a row with one
/// key, a row with none (uniform weights, as eager attention), partly masked rows.
#[test]
fn softmax_backward_of_the_cuda_path_matches_the_kernel() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, cols) = (7, 13);
    let mut data = randn(&mut rng, rows * cols, 3.0);
    data[cols + 1..2 * cols].fill(f32::MIN); // row 1: one key
    data[2 * cols..3 * cols].fill(f32::MIN); // row 2: none
    for r in 3..rows {
        for c in (r..cols).step_by(3) {
            data[r * cols + c] = f32::MIN;
        }
    }
    let x = Tensor::from_vec(data, (1, rows, cols), &Device::Cpu)?;
    let y = softmax_last(&x)?;
    let g = Tensor::from_vec(
        randn(&mut rng, rows * cols, 1.0),
        (1, rows, cols),
        &Device::Cpu,
    )?;
    let want = {
        let var = Var::from_tensor(&x)?;
        let grads = (softmax_last(var.as_tensor())? * &g)?
            .sum_all()?
            .backward()?;
        grads.get(var.as_tensor()).expect("gradient").clone()
    };
    let got = orpo::ops::softmax_last_bwd_ops(&y, &g)?;
    assert_close("softmax backward (ops)", &got, &want, 1e-5, 1e-6)?;
    let y = y.squeeze(0)?.to_vec2::<f32>()?;
    assert_eq!(y[1][0], 1.0);
    assert!(y[2].iter().all(|&p| (p - 1.0 / cols as f32).abs() < 1e-7));
    Ok(())
}

#[test]
fn softmax_on_strided_input_and_fully_masked_rows() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = Tensor::from_vec(randn(&mut rng, 6 * 9, 2.0), (6, 9), &Device::Cpu)?;
    let w = Tensor::from_vec(randn(&mut rng, 6 * 9, 1.0), (9, 6), &Device::Cpu)?;
    // A transposed (non-contiguous) input goes through an implicit copy, gradient included.
    let (y, gx) = value_and_grad(&x, &w, |x| softmax_last(&x.t()?))?;
    let (y_ref, gx_ref) = value_and_grad(&x, &w, |x| softmax_last_chain(&x.t()?))?;
    assert_close("strided value", &y, &y_ref, 1e-5, 1e-7)?;
    assert_close("strided grad", &gx, &gx_ref, 1e-5, 1e-6)?;

    // A fully masked row gives zeros (not NaN) and zero gradient; other rows, a single-key
    // row among them (probability 1, gradient 0), are unaffected; in the chain (the CUDA
    // path) as in the kernel.
    let mut data = randn(&mut rng, 3 * 4, 1.0);
    data[4..8].fill(f32::NEG_INFINITY);
    data[9..12].fill(f32::NEG_INFINITY);
    let x = Tensor::from_vec(data, (3, 4), &Device::Cpu)?;
    let w = Tensor::from_vec(randn(&mut rng, 12, 1.0), (3, 4), &Device::Cpu)?;
    let (y_ref, gx_ref) = value_and_grad(&x, &w, softmax_last)?;
    for (what, f) in [
        ("fused", softmax_last as fn(&Tensor) -> Result<Tensor>),
        ("chain", softmax_last_chain),
    ] {
        let (y, gx) = value_and_grad(&x, &w, f)?;
        assert_close(&format!("{what} masked rows"), &y, &y_ref, 1e-6, 1e-7)?;
        assert_close(&format!("{what} masked grads"), &gx, &gx_ref, 1e-6, 1e-7)?;
        let y = y.to_vec2::<f32>()?;
        let gx = gx.to_vec2::<f32>()?;
        assert_eq!(y[1], vec![0.0; 4], "{what}");
        assert_eq!(gx[1], vec![0.0; 4], "{what}");
        assert_eq!(y[2], vec![1.0, 0.0, 0.0, 0.0], "{what}");
        assert_eq!(gx[2], vec![0.0; 4], "{what}");
        assert!(
            y.iter()
                .flatten()
                .chain(gx.iter().flatten())
                .all(|v| v.is_finite()),
            "{what}"
        );
    }
    Ok(())
}

fn random_logits(rng: &mut ChaCha8Rng, m: usize, v: usize) -> Result<(Tensor, Tensor)> {
    let logits = Tensor::from_vec(randn(rng, m * v, 4.0), (m, v), &Device::Cpu)?;
    let t: Vec<u32> = (0..m).map(|_| rng.gen_range(0..v as u32)).collect();
    Ok((logits, Tensor::from_vec(t, m, &Device::Cpu)?))
}

#[test]
fn token_logprobs_matches_chain_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (m, v) in [(1, 1), (1, 9), (4, 7), (33, 130), (300, 5000)] {
        let (logits, targets) = random_logits(&mut rng, m, v)?;
        let mut w = randn(&mut rng, m, 1.0);
        if m > 3 {
            w[1] = 0.0; // a row without gradient (prompt/padding position)
        }
        let w = Tensor::from_vec(w, m, &Device::Cpu)?;
        let (lp, g) = value_and_grad(&logits, &w, |x| token_logprobs(x, &targets))?;
        let (lp_ref, g_ref) = value_and_grad(&logits, &w, |x| token_logprobs_chain(x, &targets))?;
        assert_close(
            &format!("logprobs [{m}, {v}] value"),
            &lp,
            &lp_ref,
            1e-5,
            1e-5,
        )?;
        assert_close(&format!("logprobs [{m}, {v}] grad"), &g, &g_ref, 1e-5, 1e-7)?;
        // Each gradient row sums to 0 (onehot and softmax both sum to 1).
        let row_sums = g.sum(1)?.to_vec1::<f32>()?;
        assert!(row_sums.iter().all(|s| s.abs() < 1e-5), "{row_sums:?}");
    }
    Ok(())
}

#[test]
fn token_logprobs_batched_shape_and_other_target_dtypes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (logits, targets) = random_logits(&mut rng, 10, 23)?;
    let logits3 = logits.reshape((2, 5, 23))?;
    let targets2 = targets.reshape((2, 5))?;
    let w = Tensor::from_vec(randn(&mut rng, 10, 1.0), (2, 5), &Device::Cpu)?;
    let (lp, g) = value_and_grad(&logits3, &w, |x| token_logprobs(x, &targets2))?;
    let (lp_ref, g_ref) = value_and_grad(&logits3, &w, |x| token_logprobs_chain(x, &targets2))?;
    assert_eq!(lp.dims(), &[2, 5]);
    assert_eq!(g.dims(), &[2, 5, 23]);
    assert_close("3-d value", &lp, &lp_ref, 1e-5, 1e-5)?;
    assert_close("3-d grad", &g, &g_ref, 1e-5, 1e-7)?;
    let lp64 = token_logprobs(&logits3, &targets2.to_dtype(DType::I64)?)?;
    assert_close("i64 targets", &lp64, &lp, 0.0, 0.0)?;
    // Wrong target shape and float targets are errors.
    assert!(token_logprobs(&logits3, &targets).is_err());
    assert!(token_logprobs(&logits, &targets.to_dtype(DType::F32)?).is_err());
    Ok(())
}

/// Central differences of `sum(f(x) * w)` in f32, compared with the analytic gradient.
fn finite_difference_check(
    what: &str,
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    let (_, g) = value_and_grad(x, w, &f)?;
    let g = g.flatten_all()?.to_vec1::<f32>()?;
    let base = x.flatten_all()?.to_vec1::<f32>()?;
    let h = 1e-2f32;
    let objective = |data: Vec<f32>| -> Result<f64> {
        let xp = Tensor::from_vec(data, x.shape(), &Device::Cpu)?;
        let y = f(&xp)?.to_dtype(DType::F64)?;
        (y * w.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
    };
    for i in 0..base.len() {
        if !base[i].is_finite() {
            assert_eq!(g[i], 0.0, "{what}: masked entry {i}");
            continue;
        }
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let fd = (objective(plus)? - objective(minus)?) / (2.0 * h as f64);
        let err = (fd - g[i] as f64).abs();
        assert!(
            err < 2e-3 * (1.0 + fd.abs()),
            "{what}: entry {i}: fd {fd} vs analytic {}",
            g[i]
        );
    }
    Ok(())
}

#[test]
fn finite_differences_tiny() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut data = randn(&mut rng, 2 * 5, 1.0);
    data[3] = f32::NEG_INFINITY;
    let x = Tensor::from_vec(data, (2, 5), &Device::Cpu)?;
    let w = Tensor::from_vec(randn(&mut rng, 10, 1.0), (2, 5), &Device::Cpu)?;
    finite_difference_check("softmax", &x, &w, softmax_last)?;

    let (logits, targets) = random_logits(&mut rng, 3, 6)?;
    let w = Tensor::from_vec(randn(&mut rng, 3, 1.0), 3, &Device::Cpu)?;
    finite_difference_check("token_logprobs", &logits, &w, |x| {
        token_logprobs(x, &targets)
    })
}

/// Best-of-`reps` seconds for forward + backward of `sum(f(x) * w)`.
fn time_fwd_bwd(
    x: &Tensor,
    w: &Tensor,
    reps: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f64, f64)> {
    let var = Var::from_tensor(x)?;
    let (mut best_f, mut best_t) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t0 = Instant::now();
        let y = f(var.as_tensor())?;
        let tf = t0.elapsed().as_secs_f64();
        let grads = (&y * w)?.sum_all()?.backward()?;
        let t = t0.elapsed().as_secs_f64();
        assert!(grads.get(var.as_tensor()).is_some());
        drop(grads);
        best_f = best_f.min(tf);
        best_t = best_t.min(t);
    }
    Ok((best_f, best_t))
}

#[test]
#[ignore = "timing; run with --release -- --ignored --nocapture"]
fn timing_fused_vs_chain() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    println!("threads: {}", candle_core::utils::get_num_threads());

    let shape = [8usize, 12, 256, 256];
    // Causal mask, as attention scores look.
    let n: usize = shape.iter().product();
    let mut data = randn(&mut rng, n, 3.0);
    for (r, row) in data.chunks_mut(256).enumerate() {
        row[(r % 256) + 1..].fill(f32::NEG_INFINITY);
    }
    let x = Tensor::from_vec(data, &shape, &Device::Cpu)?;
    let w = Tensor::from_vec(randn(&mut rng, n, 1.0), &shape, &Device::Cpu)?;
    let (ff, ft) = time_fwd_bwd(&x, &w, 3, softmax_last)?;
    let (cf, ct) = time_fwd_bwd(&x, &w, 3, softmax_last_chain)?;
    // Shared cost of the harness itself (loss, candle's gradient accumulation).
    let (_, bt) = time_fwd_bwd(&x, &w, 3, |x| x.affine(1.0, 0.0))?;
    println!("softmax harness overhead (identity op): {:.1} ms", bt * 1e3);
    println!(
        "softmax {shape:?}: fused fwd {:.1} ms, fwd+bwd {:.1} ms | chain fwd {:.1} ms, fwd+bwd {:.1} ms | x{:.1}",
        ff * 1e3, ft * 1e3, cf * 1e3, ct * 1e3, ct / ft
    );

    let (m, v) = (2000, 50272);
    let (logits, targets) = random_logits(&mut rng, m, v)?;
    let w = Tensor::from_vec(randn(&mut rng, m, 1.0), m, &Device::Cpu)?;
    let (ff, ft) = time_fwd_bwd(&logits, &w, 2, |x| token_logprobs(x, &targets))?;
    let (cf, ct) = time_fwd_bwd(&logits, &w, 2, |x| token_logprobs_chain(x, &targets))?;
    let (_, bt) = time_fwd_bwd(&logits, &w, 2, |x| x.affine(1.0, 0.0)?.sum(1))?;
    println!(
        "token_logprobs harness overhead (row sum): {:.1} ms",
        bt * 1e3
    );
    println!(
        "token_logprobs [{m}, {v}]: fused fwd {:.1} ms, fwd+bwd {:.1} ms | chain fwd {:.1} ms, fwd+bwd {:.1} ms | x{:.1}",
        ff * 1e3, ft * 1e3, cf * 1e3, ct * 1e3, ct / ft
    );
    Ok(())
}

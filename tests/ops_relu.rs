//! The fused `orpo::ops::relu` against candle's `relu`: values and gradients must be equal
//! bit for bit (including x == 0, which candle's backward counts as active), strided input, and
//! the fallback for other dtypes.

use candle_core::{DType, Device, Result, Tensor, Var};
use orpo::ops::relu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn value_and_grad(
    x: &Tensor,
    r: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let v = Var::from_tensor(x)?;
    let y = f(v.as_tensor())?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let g = grads.get(v.as_tensor()).expect("gradient of x");
    Ok((y.flatten_all()?.to_vec1()?, g.flatten_all()?.to_vec1()?))
}

#[test]
fn relu_matches_candle_bit_for_bit() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for n in [1usize, 7, 4096, 4097, 100_000] {
        // About a tenth exact zeros, the rest on both sides of 0.
        let xs: Vec<f32> = (0..n)
            .map(|_| {
                if rng.gen_bool(0.1) {
                    0.0
                } else {
                    rng.gen_range(-2.0f32..2.0)
                }
            })
            .collect();
        let rs: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let x = Tensor::from_vec(xs, n, &Device::Cpu)?;
        let r = Tensor::from_vec(rs, n, &Device::Cpu)?;
        let (y, g) = value_and_grad(&x, &r, relu)?;
        let (y_ref, g_ref) = value_and_grad(&x, &r, |t| t.relu())?;
        assert_eq!(y, y_ref, "values, n={n}");
        assert_eq!(g, g_ref, "grads, n={n}");
    }
    Ok(())
}

#[test]
fn strided_input_and_fallback() -> Result<()> {
    let x = Tensor::arange(-6f32, 6., &Device::Cpu)?
        .reshape((3, 4))?
        .t()?;
    let r = Tensor::ones((4, 3), DType::F32, &Device::Cpu)?;
    let (y, g) = value_and_grad(&x, &r, relu)?;
    let (y_ref, g_ref) = value_and_grad(&x, &r, |t| t.relu())?;
    assert_eq!((y, g), (y_ref, g_ref));
    let y64 = relu(&x.to_dtype(DType::F64)?)?;
    assert_eq!(y64.dtype(), DType::F64);
    Ok(())
}

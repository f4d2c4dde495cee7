//! The odds-ratio term's gradient coefficients, computed on the log-probs' own device.
//!
//! The loss linearises the odds term as `sum_i d_i * lp_i` (see `forward.rs`), with the `d_i`
//! from `loss::odds_term` in f64. Computing them on the host means reading the log-probs back
//! mid-step: on a GPU the host then waits for the whole forward before it can queue the first
//! kernel of the backward. Here they come from an op on the device (CUDA: `odds.cu`, the same
//! arithmetic in double), so the host queues the backward at once and reads the metrics once,
//! after it. On the CPU the op calls `odds_term` itself: the same numbers as before, bit for
//! bit.

use super::loss::odds_term;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `d` (`[2B]` f32: chosen, then rejected) for mean answer log-probs `lp` (`[2B]`, same
/// layout), `beta` the odds term's weight. Carries no graph: the coefficients are constants
/// of the linearised term.
pub fn odds_coefficients(lp: &Tensor, beta: f64) -> Result<Tensor> {
    let lp = lp.detach().to_dtype(DType::F32)?.contiguous()?;
    let device_op = lp.device().is_cpu() || (lp.device().is_cuda() && crate::ops::cuda_kernels());
    if device_op {
        return lp.apply_op1_no_bwd(&OddsCoefficients { beta });
    }
    // Other devices, or `ORPO_CUDA_KERNELS=0`: through the host (one synchronisation).
    let host: Vec<f32> = lp.to_vec1()?;
    let d = coefficients(&host, beta)?;
    Tensor::from_vec(d, lp.dims1()?, lp.device())
}

fn coefficients(lp: &[f32], beta: f64) -> Result<Vec<f32>> {
    if !lp.len().is_multiple_of(2) {
        bail!("odds coefficients: {} log-probs, not pairs", lp.len());
    }
    let lp: Vec<f64> = lp.iter().map(|&x| f64::from(x)).collect();
    let (w, l) = lp.split_at(lp.len() / 2);
    let odds = odds_term(w, l, beta);
    Ok(odds
        .d_chosen
        .iter()
        .chain(&odds.d_rejected)
        .map(|&d| d as f32)
        .collect())
}

struct OddsCoefficients {
    beta: f64,
}

impl CustomOp1 for OddsCoefficients {
    fn name(&self) -> &'static str {
        "odds-coefficients"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((a, b))) = (s, l.contiguous_offsets()) else {
            bail!("{}: contiguous f32 log-probs expected", self.name());
        };
        let d = coefficients(&data[a..b], self.beta)?;
        Ok((CpuStorage::F32(d), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/odds.ptx"));

        let n = l.shape().elem_count();
        if !n.is_multiple_of(2) {
            bail!("{}: {n} log-probs, not pairs", self.name());
        }
        let pairs = n / 2;
        let lp = crate::ops::cuda_view::<f32>(self.name(), s, l)?;
        let dev = s.device().clone();
        let func = dev.get_or_load_custom_func("odds_coefficients", "orpo_odds", PTX)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let mut b = func.builder();
        b.arg(&lp);
        b.arg(&out);
        b.arg(&pairs);
        b.arg(&self.beta);
        // SAFETY: arguments as the kernel's signature (lp, d, pairs, beta); a grid-stride loop.
        unsafe { b.launch(LaunchConfig::for_num_elems(pairs.max(1) as u32)) }.w()?;
        Ok((f32::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_op_gives_odds_term_derivatives_in_pair_layout() -> Result<()> {
        let lp = [-1.0f32, -0.01, -0.5, -2.0, -0.02, -0.5];
        let t = Tensor::new(&lp, &Device::Cpu)?;
        let got: Vec<f32> = odds_coefficients(&t, 0.1)?.to_vec1()?;
        let w: Vec<f64> = lp[..3].iter().map(|&x| x.into()).collect();
        let l: Vec<f64> = lp[3..].iter().map(|&x| x.into()).collect();
        let want = odds_term(&w, &l, 0.1);
        for (i, g) in got.iter().enumerate() {
            let d = if i < 3 {
                want.d_chosen[i]
            } else {
                want.d_rejected[i - 3]
            };
            assert_eq!(*g, d as f32, "coefficient {i}");
        }
        // A graph on the input does not reach the coefficients.
        let v = candle_core::Var::from_tensor(&t)?;
        assert!(!odds_coefficients(v.as_tensor(), 0.1)?.track_op());
        assert!(odds_coefficients(&Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?, 0.1).is_err());
        Ok(())
    }
}

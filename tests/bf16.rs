//! bf16 compute (`model.dtype = "bf16"`): matrix products take bf16 inputs with f32
//! accumulation, as under torch autocast; weights, optimizer state, norms, softmax, the loss
//! and the odds-ratio term stay f32. Agreement with the f32 path on every fixture, measured on
//! the golden first batch (the tolerances below are what README.md documents).

mod common;

use candle_core::{DType, Device};
use common::*;
use orpo::model::{CausalLm, LoadOptions};
use orpo::train::batch::collate;
use orpo::train::forward::forward;
use orpo::train::loss::METRIC_NAMES;

fn load(name: &str, compute: DType) -> CausalLm {
    let opts = LoadOptions {
        compute,
        ..LoadOptions::default()
    };
    CausalLm::load_with(&model_dir(name), &Device::Cpu, opts).unwrap()
}

fn pad_id(g: &serde_json::Value) -> u32 {
    g["pad_token_id"].as_u64().unwrap() as u32
}

fn norm(t: &candle_core::Tensor) -> f64 {
    t.to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64
}

#[test]
fn bf16_compute_agrees_with_f32_on_every_fixture() {
    let (mut worst_loss, mut worst_grad) = (0.0f64, 0.0f64);
    for name in MODELS {
        let g = golden(name);
        let pairs = golden_pairs(&g, "tokenized");
        let refs: Vec<_> = pairs.iter().take(2).collect();
        let (f, b) = (load(name, DType::F32), load(name, DType::BF16));
        let batch = collate(&refs, pad_id(&g), true, f.packed_padding(), &Device::Cpu).unwrap();
        assert_eq!(b.compute_dtype(), DType::BF16);
        let (of, ob) = (
            forward(&f, &batch, 0.1).unwrap(),
            forward(&b, &batch, 0.1).unwrap(),
        );
        let rel = (of.readout.metrics(None).unwrap().loss - ob.readout.metrics(None).unwrap().loss)
            .abs()
            / of.readout.metrics(None).unwrap().loss.abs();
        worst_loss = worst_loss.max(rel);
        assert!(
            rel < 1e-3,
            "{name}: loss {} vs {}",
            ob.readout.metrics(None).unwrap().loss,
            of.readout.metrics(None).unwrap().loss
        );
        for key in ["logps/chosen", "logps/rejected", "nll_loss"] {
            let (x, y) = (
                of.readout.metrics(None).unwrap().get(key).unwrap(),
                ob.readout.metrics(None).unwrap().get(key).unwrap(),
            );
            assert!((x - y).abs() <= 1e-3 * x.abs(), "{name} {key}: {y} vs {x}");
        }
        assert!(METRIC_NAMES.iter().all(|k| ob
            .readout
            .metrics(None)
            .unwrap()
            .get(k)
            .unwrap()
            .is_finite()));
        let (gf, gb) = (
            f.gradients(&of.objective).unwrap(),
            b.gradients(&ob.objective).unwrap(),
        );
        for ((pname, vf), (_, vb)) in f.params().iter().zip(b.params().iter()) {
            let x = gf.get(vf.as_tensor()).unwrap();
            let y = gb.get(vb.as_tensor()).unwrap();
            // Master weights stay f32; a weight used through its bf16 copy keeps that copy's
            // gradient in bf16 (the same values its f32 widening had: `ops::bf16_copy`), any
            // other gradient is f32.
            assert_eq!(vb.dtype(), DType::F32, "{name} {pname}");
            let want = if pname.ends_with(".weight")
                && vb.rank() == 2
                && !pname.contains("emb")
                && !pname.contains("lm_head")
            {
                DType::BF16
            } else {
                DType::F32
            };
            assert_eq!(y.dtype(), want, "{name} {pname}");
            let (nx, ny) = (norm(x), norm(y));
            if nx < 1e-6 {
                continue; // k_proj.bias: zero in exact arithmetic, rounding noise in both
            }
            let rel = (nx - ny).abs() / nx;
            worst_grad = worst_grad.max(rel);
            assert!(rel < 3e-2, "{name} {pname}: grad norm {ny} vs {nx}");
        }
    }
    eprintln!("worst relative difference: loss {worst_loss:.2e}, grad norm {worst_grad:.2e}");
}

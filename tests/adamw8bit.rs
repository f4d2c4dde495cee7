//! bitsandbytes' 8-bit AdamW (`optim.optimizer = "adamw_8bit"`) against bitsandbytes 0.50
//! itself (`tests/fixtures/golden/extra/adamw8bit.bnb.json`, scripts/adamw8bit_golden.py):
//! three steps of `bnb.optim.AdamW(optim_bits=8)` on four tensors — one of exactly 4,096 values,
//! one with a short last block, an undecayed one (a bias), one under `min_8bit_size` that keeps
//! f32 moments — with a zero 256-block and a whole zero gradient among the steps. Codes are
//! compared with bitsandbytes' nearest-code kernel (its torch kernel, as its CUDA kernels pick
//! them), parameters and absmax values within f32 rounding: bitsandbytes' CPU update fuses
//! multiply-adds that orpo rounds twice (and the GPU kernel equals orpo's CPU update bit for
//! bit, `scripts/cuda-emu/adamw8bit_check.cpp`).

mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use orpo::model::Params;
use orpo::train::optim::{AdamW, AdamWSettings};
use serde_json::Value;
use std::collections::HashMap;

fn golden() -> Value {
    let path = fixtures().join("golden/extra/adamw8bit.bnb.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Golden tensor names as orpo names parameters: the undecayed group's as a bias (transformers'
/// rule puts biases there).
fn param_name(t: &Value) -> String {
    let name = t["name"].as_str().unwrap();
    if t["weight_decay"].as_f64().unwrap() == 0.0 {
        format!("{name}.bias")
    } else {
        format!("{name}.weight")
    }
}

/// Parameters, or optimizer state, after each step.
type Steps = Vec<HashMap<String, Tensor>>;

fn run(eight_bit: bool) -> (Value, Steps, Steps) {
    let g = golden();
    let s = &g["settings"];
    let beta = |i: usize| s["betas"][i].as_f64().unwrap();
    let mut params = Params::default();
    for t in g["tensors"].as_array().unwrap() {
        let init = Tensor::new(f32s(&t["initial"]), &Device::Cpu).unwrap();
        params.insert(param_name(t), Var::from_tensor(&init).unwrap());
    }
    let mut opt = AdamW::new(AdamWSettings {
        beta1: beta(0),
        beta2: beta(1),
        eps: s["eps"].as_f64().unwrap(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
        eight_bit,
    });
    let lr = s["lr"].as_f64().unwrap();
    let (mut after, mut states) = (Vec::new(), Vec::new());
    for step in 0..s["steps"].as_u64().unwrap() as usize {
        let grads: HashMap<String, Tensor> = g["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let grad = f32s(&t["steps"][step]["grad"]);
                (param_name(t), Tensor::new(grad, &Device::Cpu).unwrap())
            })
            .collect();
        opt.step(&params, &grads, lr, 1.0).unwrap();
        after.push(params.snapshot().unwrap());
        states.push(opt.state_tensors().unwrap());
    }
    (g, after, states)
}

/// The largest difference over the largest magnitude of `want`.
fn rel(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

#[test]
fn eight_bit_steps_match_bitsandbytes() {
    let (g, after, states) = run(true);
    for t in g["tensors"].as_array().unwrap() {
        let name = param_name(t);
        let eight = t["state_bits"].as_u64() == Some(8);
        for (k, want) in t["steps"].as_array().unwrap().iter().enumerate() {
            let step = k + 1;
            let got: Vec<f32> = after[k][&name].flatten_all().unwrap().to_vec1().unwrap();
            let err = rel(&got, &f32s(&want["param"]));
            assert!(
                err < 2e-7,
                "{name} step {step}: parameters off by {err:.2e}"
            );
            let st = &states[k];
            if !eight {
                assert!(
                    !st.contains_key(&format!("exp_avg_8bit.{name}")),
                    "{name}: under min_8bit_size, f32 moments"
                );
                for (key, bnb) in [("exp_avg", "state1"), ("exp_avg_sq", "state2")] {
                    let got: Vec<f32> = st[&format!("{key}.{name}")].to_vec1().unwrap();
                    let err = rel(&got, &f32s(&want[bnb]));
                    assert!(err < 1e-6, "{name} step {step} {key}: off by {err:.2e}");
                }
                continue;
            }
            for (key, codes, absmax) in [
                ("exp_avg", "state1_codes", "absmax1"),
                ("exp_avg_sq", "state2_codes", "absmax2"),
            ] {
                let got_codes: Vec<u8> = st[&format!("{key}_8bit.{name}")].to_vec1().unwrap();
                let want_codes = json_u8s(&want[codes]);
                // A value within f32 rounding of a midpoint between codes may take the other.
                let flipped = got_codes
                    .iter()
                    .zip(&want_codes)
                    .filter(|(a, b)| a != b)
                    .count();
                assert!(
                    flipped * 1000 <= want_codes.len(),
                    "{name} step {step} {key}: {flipped} of {} codes differ",
                    want_codes.len()
                );
                let got_max: Vec<f32> = st[&format!("{key}_absmax.{name}")].to_vec1().unwrap();
                let want_max = f32s(&want[absmax]);
                assert_eq!(got_max.len(), want_max.len(), "{name}: one absmax a block");
                let err = rel(&got_max, &want_max);
                assert!(
                    err < 1e-6,
                    "{name} step {step} {key} absmax: off by {err:.2e}"
                );
            }
        }
    }
}

/// The golden tells the 8-bit update from torch's f32 one: the same steps with f32 moments
/// leave the 8-bit tensors' parameters visibly elsewhere.
#[test]
fn f32_moments_do_not_match_the_eight_bit_golden() {
    let (g, after, _) = run(false);
    let t = &g["tensors"][0];
    assert_eq!(t["state_bits"].as_u64(), Some(8));
    let name = param_name(t);
    let got: Vec<f32> = after[2][&name].flatten_all().unwrap().to_vec1().unwrap();
    let err = rel(&got, &f32s(&t["steps"][2]["param"]));
    assert!(
        err > 1e-3,
        "{name}: f32 moments within {err:.2e} of the 8-bit golden"
    );
}

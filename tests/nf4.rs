//! The 4-bit quantization of QLoRA's base against bitsandbytes 0.50's own outputs
//! (`tests/fixtures/golden/extra/nf4.bnb.json`, `scripts/nf4_golden.py`): random weights,
//! short and odd blocks, a zero block, values exactly on the midpoints between codes, and two
//! fixtures' real weights, as transformers' `BitsAndBytesConfig(load_in_4bit=True)` stores them.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use orpo::model::nf4::{self, Nf4Rows};
use serde_json::Value;

fn golden() -> Value {
    let path = fixtures().join("golden/extra/nf4.bnb.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_code_tables_are_bitsandbytes() {
    let g = golden();
    assert_eq!(f32s(&g["nf4_code"]), nf4::NF4.to_vec());
    // create_dynamic_map(signed=True), to the bit (torch's linspace included).
    assert_eq!(f32s(&g["dynamic_code"]), nf4::dynamic_map());
}

/// Codes, scales and dequantized values equal bitsandbytes' bit for bit, ties included (the
/// lower code, as `torch.bucketize`), and the product's dequantization reads them so.
#[test]
fn nf4_codes_and_scales_are_bitsandbytes_bit_for_bit() {
    let g = golden();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = f32s(&case["input"]);
        let want = &case["plain"];
        let (packed, absmax) = nf4::quantize(&input);
        let want_packed: Vec<u8> = want["packed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(packed, want_packed, "{name}: packed codes");
        assert_eq!(absmax, f32s(&want["absmax"]), "{name}: absmax");
        let deq: Vec<f32> = (0..input.len())
            .map(|i| nf4::dequantize_elem(&packed, &absmax, i))
            .collect();
        assert_eq!(deq, f32s(&want["dequantized"]), "{name}: dequantized");

        // The same through the weight a model holds and the op that reads it.
        let dims: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let w = Tensor::from_vec(input.clone(), dims.as_slice(), &Device::Cpu).unwrap();
        let rows = Nf4Rows::whole(nf4::quantize_weight(&w, false, &Device::Cpu).unwrap());
        let got = rows
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, deq, "{name}: op's dequantization");
    }
}

/// Double quantization: each 64-block's scale as bitsandbytes dequantizes it, up to what its
/// CPU path's lookup table and torch's f32 mean do differently (see `nf4::double_quantized`):
/// the mean to an f32 rounding, and a code the table picks up to its step (2/65535) farther
/// from the deviation than the nearest, which orpo takes. Every other scale equals
/// bitsandbytes' up to the mean's rounding.
#[test]
fn double_quantized_scales_are_bitsandbytes_up_to_its_lookup_table() {
    let g = golden();
    let code = nf4::dynamic_map();
    let mut compared = 0;
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (_, absmax) = nf4::quantize(&f32s(&case["input"]));
        let want = &case["double_quant"];
        let got = nf4::double_quantized(&absmax);
        let want_scales = f32s(&want["absmax_dequantized"]);
        let offset = want["offset"].as_f64().unwrap() as f32;
        let state2 = f32s(&want["state2_absmax"]);
        let codes: Vec<usize> = want["qabsmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mean_ulp = offset.abs() * f32::EPSILON * 2.0;
        let mut off_code = 0;
        for (i, (&a, &b)) in got.iter().zip(&want_scales).enumerate() {
            let am2 = state2[i / 256];
            if (a - b).abs() <= 2.0 * mean_ulp + 4.0 * f32::EPSILON * b.abs() {
                continue;
            }
            // orpo's code is the nearest; bitsandbytes' table picks one at most its step
            // (2/65535) farther from the deviation.
            let x = (absmax[i] - offset) * (1.0 / am2);
            let mine = (0..code.len())
                .min_by(|&p, &q| (code[p] - x).abs().total_cmp(&(code[q] - x).abs()))
                .unwrap();
            let theirs = codes[i];
            let (d_mine, d_theirs) = ((code[mine] - x).abs(), (code[theirs] - x).abs());
            assert!(
                d_theirs <= d_mine + 2.0 / 65535.0,
                "{name}: scale {i} = {a}, bitsandbytes {b}: codes {mine} and {theirs} for {x}"
            );
            assert!(
                (a - (code[mine] * am2 + offset)).abs() <= 2.0 * mean_ulp,
                "{name}: scale {i} = {a} is not the nearest code's"
            );
            off_code += 1;
        }
        let lut = want["lut_codes_differing_from_nearest"].as_u64().unwrap() as usize;
        assert!(
            off_code <= lut,
            "{name}: {off_code} scales off, the table moved {lut}"
        );
        compared += got.len();
    }
    assert!(compared > 500);
}

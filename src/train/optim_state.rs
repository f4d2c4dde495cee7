//! Checking saved optimizer state before a resume restores it: every moment there, of the
//! right kind and size, finite, non-negative where it must be; nothing else in the file.

use super::adamw8bit;
use super::optim::eight_bit_moments;
use crate::model::Params;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use std::collections::HashMap;

/// Why saved optimizer state (`AdamW::state_tensors`' tensors) cannot be restored for the
/// trainable `params` of a run at optimizer step `step` whose optimizer keeps 8-bit moments
/// (`eight_bit`) or not, if it cannot; each message names the tensor at fault. Every parameter
/// needs its moments, of the kind this optimizer keeps for it, of its size (flat, as saved, or
/// in its shape, as the first versions saved them) and finite, second moments and absmax values
/// non-negative; `step` must be the run's; no other tensor may be there. Values are scanned in
/// one pass per tensor, reduced where the tensor lives (one value each read back, all of them
/// in one transfer). The outer error is a failed computation, not a bad file.
pub fn check_state(
    params: &Params,
    tensors: &HashMap<String, Tensor>,
    eight_bit: bool,
    step: usize,
) -> Result<std::result::Result<(), String>> {
    use std::result::Result::{Err as Bad, Ok as Good};
    if !tensors.keys().any(|k| k.starts_with("exp_avg")) {
        let mut held: Vec<&String> = tensors.keys().collect();
        held.sort();
        let shown: Vec<&str> = held.iter().take(3).map(|k| k.as_str()).collect();
        return Ok(Bad(format!(
            "holds no AdamW moments (`exp_avg.NAME` tensors) but {} tensor(s) ({}{}); is it \
             another file?",
            held.len(),
            shown.join(", "),
            if held.len() > 3 { ", ..." } else { "" }
        )));
    }
    let mut expected: std::collections::HashSet<String> = ["step".to_string()].into();
    // (key, tensor, whether it must also be non-negative)
    let mut scan: Vec<(String, &Tensor, bool)> = Vec::new();
    for (name, var) in params.iter() {
        let n = var.elem_count();
        let dims = var.dims();
        let eight = eight_bit && eight_bit_moments(params, name, n);
        let (kinds, other, this_bits, other_bits) = if eight {
            let blocks = n.div_ceil(adamw8bit::BLOCK);
            (
                vec![
                    ("exp_avg_8bit", n, Some(DType::U8), false),
                    ("exp_avg_absmax", blocks, Some(DType::F32), true),
                    ("exp_avg_sq_8bit", n, Some(DType::U8), false),
                    ("exp_avg_sq_absmax", blocks, Some(DType::F32), true),
                ],
                "exp_avg",
                "8",
                "32",
            )
        } else {
            (
                vec![("exp_avg", n, None, false), ("exp_avg_sq", n, None, true)],
                "exp_avg_8bit",
                "32",
                "8",
            )
        };
        for (kind, len, dtype, non_negative) in kinds {
            let key = format!("{kind}.{name}");
            let Some(t) = tensors.get(&key) else {
                if tensors.contains_key(&format!("{other}.{name}")) {
                    return Ok(Bad(format!(
                        "holds {other_bits}-bit moments for `{name}` (`{other}.{name}`), this \
                         run's optimizer keeps them in {this_bits} bits (optim.optimizer); \
                         resume with the optimizer the run started with"
                    )));
                }
                return Ok(Bad(format!(
                    "lacks `{key}`, the optimizer state of the trainable parameter `{name}`"
                )));
            };
            if t.dims() != [len] && !(len == n && t.dims() == dims) {
                return Ok(Bad(format!(
                    "`{key}` has shape {:?}, not [{len}] (the parameter's shape is {dims:?})",
                    t.dims()
                )));
            }
            match dtype {
                Some(d) if t.dtype() != d => {
                    return Ok(Bad(format!("`{key}` is {:?}, not {d:?}", t.dtype())))
                }
                None if !t.dtype().is_float() => {
                    return Ok(Bad(format!(
                        "`{key}` is {:?}, not floating point",
                        t.dtype()
                    )))
                }
                _ => {}
            }
            if dtype != Some(DType::U8) {
                scan.push((key.clone(), t, non_negative));
            }
            expected.insert(key);
        }
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
    extra.sort();
    if let Some(k) = extra.first() {
        return Ok(Bad(format!(
            "holds `{k}`{}, no optimizer state of this model's trainable parameters",
            match extra.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        )));
    }
    let Some(t) = tensors.get("step") else {
        return Ok(Bad("lacks `step`, the optimizer's step count".into()));
    };
    if t.elem_count() != 1 {
        return Ok(Bad(format!(
            "`step` has shape {:?}, not one value",
            t.dims()
        )));
    }
    let saved = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    if !(saved.is_finite() && saved >= 0.0 && saved.fract() == 0.0) {
        return Ok(Bad(format!(
            "`step` is {saved}, not a whole number of steps"
        )));
    }
    if saved != step as f64 {
        return Ok(Bad(format!(
            "`step` is {saved}, but the checkpoint's global_step is {step}"
        )));
    }
    let flagged = flag_values(&scan.iter().map(|(_, t, nn)| (*t, *nn)).collect::<Vec<_>>())?;
    if let Some(((key, _, non_negative), _)) = scan.iter().zip(flagged).find(|(_, bad)| *bad) {
        let what = if *non_negative {
            "a negative or non-finite value"
        } else {
            "a non-finite value"
        };
        return Ok(Bad(format!("`{key}` holds {what}")));
    }
    Ok(Good(()))
}

/// For each tensor, whether it holds a non-finite value (or, with its flag, a negative one).
/// f32 tensors in host memory are read in place; others are reduced on their device to one
/// value each (NaN when one is at fault: `x * 0` is NaN for an infinite or NaN `x`, and the
/// square root of a negative is NaN), read back in one transfer.
fn flag_values(tensors: &[(&Tensor, bool)]) -> Result<Vec<bool>> {
    let mut flags = vec![false; tensors.len()];
    let mut on_device = Vec::new();
    for (i, (t, non_negative)) in tensors.iter().enumerate() {
        if let Some(bad) = host_flag(t, *non_negative) {
            flags[i] = bad;
            continue;
        }
        if t.elem_count() == 0 {
            continue;
        }
        let x = if *non_negative {
            t.sqrt()?
        } else {
            (*t).clone()
        };
        let sum = x.affine(0.0, 0.0)?.sum_all()?;
        on_device.push((i, sum.to_dtype(DType::F32)?.reshape(1)?));
    }
    if !on_device.is_empty() {
        let sums: Vec<Tensor> = on_device.iter().map(|(_, s)| s.clone()).collect();
        let sums: Vec<f32> = Tensor::cat(&sums, 0)?.to_vec1()?;
        for ((i, _), s) in on_device.iter().zip(sums) {
            flags[*i] = s.is_nan();
        }
    }
    Ok(flags)
}

/// [`flag_values`]' answer for an f32 tensor in host memory, read in place.
fn host_flag(t: &Tensor, non_negative: bool) -> Option<bool> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return None;
    };
    let ok = move |x: &f32| x.is_finite() && (!non_negative || *x >= 0.0);
    let data = &data[a..b];
    // In parallel over large tensors (a 7B model's moments are 14G values).
    let chunk = data
        .len()
        .div_ceil(candle_core::utils::get_num_threads().max(1))
        .max(1 << 16);
    if data.len() <= chunk {
        return Some(!data.iter().all(ok));
    }
    Some(std::thread::scope(|s| {
        let parts: Vec<_> = data
            .chunks(chunk)
            .map(|c| s.spawn(move || !c.iter().all(ok)))
            .collect();
        parts.into_iter().any(|p| p.join().unwrap_or(true))
    }))
}

#[cfg(test)]
mod tests {
    use super::flag_values;
    use candle_core::{DType, Device, Tensor};

    /// Non-finite values (and negative ones where asked) are flagged alike on the host path
    /// (f32 in memory, large tensors in parallel) and the reduction path other dtypes and
    /// devices take; clean tensors, -0 and empty tensors are not.
    #[test]
    fn damaged_moments_are_flagged_on_either_path() {
        let n = 300_001;
        let clean: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        for (at, value, non_negative, want) in [
            (None, 0.0, true, false),
            (Some(n - 1), f32::INFINITY, false, true),
            (Some(0), f32::NEG_INFINITY, true, true),
            (Some(150_000), f32::NAN, false, true),
            (Some(7), -1e-30, true, true),
            (Some(7), -1e-30, false, false),
            (Some(9), -0.0, true, false),
        ] {
            let mut v = clean.clone();
            if let Some(i) = at {
                v[i] = value;
            }
            let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
            let wide = t.to_dtype(DType::F64).unwrap();
            let strided = Tensor::stack(&[&t, &t], 1)
                .unwrap()
                .narrow(1, 0, 1)
                .unwrap();
            let got = flag_values(&[
                (&t, non_negative),
                (&wide, non_negative),
                (&strided, non_negative),
            ])
            .unwrap();
            assert_eq!(got, [want; 3], "{at:?} {value} {non_negative}");
        }
        let empty = Tensor::zeros(0, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(flag_values(&[(&empty, true)]).unwrap(), [false]);
    }
}

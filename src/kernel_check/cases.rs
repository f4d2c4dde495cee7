//! The checks: each op with a kernel of its own, in f32 and (where the model runs it so) bf16,
//! at a small shape and at one that spans several blocks or a block-wide reduction.

use super::{Case, Input, OpFn, Values};
use crate::model::Params;
use crate::ops;
use crate::train::grad_norm::global_norm;
use crate::train::optim::{AdamW, AdamWSettings};
use candle_core::{DType, Result, Tensor, Var, D};
use std::collections::HashMap;

/// f32: the spec's per-forward agreement; bf16: a few roundings of 2^-8.
const F32_TOL: f64 = 1e-4;
const BF16_TOL: f64 = 2e-2;

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        BF16_TOL
    } else {
        F32_TOL
    }
}

/// A small deterministic generator (xorshift64*), so every run checks the same values.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-scale, scale)`, with full f32 mantissas (so sums of a few round).
    pub fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
                ((u * 2.0 - 1.0) * scale as f64) as f32
            })
            .collect()
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() >> 33) as u32 % n
    }
}

fn float(name: &'static str, shape: &[usize], dtype: DType, values: Vec<f32>, grad: bool) -> Input {
    Input {
        name,
        shape: shape.to_vec(),
        dtype,
        values: Values::Float(values),
        grad,
    }
}

fn random(name: &'static str, shape: &[usize], dtype: DType, scale: f32, seed: u64) -> Input {
    let n = shape.iter().product();
    float(name, shape, dtype, Rng::new(seed).values(n, scale), true)
}

fn ids(name: &'static str, values: Vec<u32>) -> Input {
    Input {
        name,
        shape: vec![values.len()],
        dtype: DType::U32,
        values: Values::Ids(values),
        grad: false,
    }
}

fn case(op: &'static str, dtype: DType, shape: &[usize], inputs: Vec<Input>, run: OpFn) -> Case {
    Case {
        op,
        dtype,
        shape: format!("{shape:?}"),
        inputs,
        run,
        reference: None,
        weights: None,
        tolerance: tolerance(dtype),
    }
}

pub(crate) fn all() -> Vec<Case> {
    let mut cases = Vec::new();
    let both = [DType::F32, DType::BF16];
    for &dt in &both {
        for shape in [[3, 5], [300, 700]] {
            cases.push(swiglu(dt, &shape));
        }
    }
    for cols in [7, 2048, 4100] {
        cases.push(rms_norm(&[6, cols]));
    }
    cases.push(layer_norm(&[5, 768]));
    cases.push(softmax(&[2, 3, 7, 9]));
    cases.push(softmax(&[4, 1100]));
    for &dt in &both {
        cases.push(attn_softmax(dt, [2, 3, 5, 7], false, None));
        cases.push(attn_softmax(dt, [1, 2, 4, 1100], true, Some(30.0)));
    }
    for &dt in &both {
        for vocab in [50, 3000] {
            cases.push(logprob_and_sum(dt, 5, vocab));
        }
    }
    cases.push(token_logprobs(&[2, 3, 40]));
    for &dt in &both {
        for width in [1, 2, 3, 4, 8, 64] {
            cases.push(row_gather(dt, width));
        }
    }
    for &dt in &both {
        cases.push(linear(dt, &[2, 7, 33], 17, false));
        cases.push(linear(dt, &[64, 256], 128, false));
    }
    cases.push(linear(DType::F32, &[5, 12], 6, true));
    for &dt in &both {
        cases.push(nf4_linear(dt, &[2, 7, 100], 24, None, false));
        cases.push(nf4_linear(dt, &[64, 256], 128, Some((40, 56)), true));
    }
    for &dt in &both {
        cases.push(column_sums(dt, &[300, 70]));
    }
    cases.push(table_lookup(false));
    cases.push(table_lookup(true));
    cases.push(rotary(&[2, 5, 3, 8], 4));
    cases.push(rotary(&[2, 5, 3, 10], 3));
    cases.push(relu(&[7, 300]));
    cases.push(bf16_copy(&[33, 17]));
    cases.push(odds_coefficients(8));
    cases.push(norm_of_gradients());
    for &dt in &both {
        cases.push(adamw(dt, false));
        cases.push(adamw(dt, true));
    }
    cases
}

fn swiglu(dt: DType, shape: &[usize]) -> Case {
    let inputs = vec![
        random("gate", shape, dt, 4.0, 1),
        random("up", shape, dt, 1.0, 2),
    ];
    case(
        "swiglu",
        dt,
        shape,
        inputs,
        Box::new(|t| ops::swiglu(&t[0], &t[1])),
    )
}

fn rms_norm(shape: &[usize]) -> Case {
    let cols = shape[1];
    let w: Vec<f32> = Rng::new(4)
        .values(cols, 0.5)
        .iter()
        .map(|v| 1.0 + v)
        .collect();
    let inputs = vec![
        random("x", shape, DType::F32, 2.0, 3),
        float("w", &[cols], DType::F32, w, true),
    ];
    case(
        "rms_norm",
        DType::F32,
        shape,
        inputs,
        Box::new(|t| ops::rms_norm(&t[0], &t[1], 1e-5)),
    )
}

fn layer_norm(shape: &[usize]) -> Case {
    let cols = shape[1];
    let inputs = vec![
        random("x", shape, DType::F32, 2.0, 5),
        random("w", &[cols], DType::F32, 1.0, 6),
        random("b", &[cols], DType::F32, 1.0, 7),
    ];
    let run: OpFn = Box::new(|t| ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5));
    case("layer_norm", DType::F32, shape, inputs, run)
}

/// Causal masks (`f32::MIN`, as the model's biases) over the last two dims; no row is empty.
fn causal_mask(rows: usize, keys: usize, lead: usize) -> Vec<f32> {
    (0..lead * rows * keys)
        .map(|i| {
            let (q, k) = ((i / keys) % rows, i % keys);
            if k > q + keys.saturating_sub(rows) {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect()
}

fn softmax(shape: &[usize]) -> Case {
    let (rows, keys) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let lead = shape.iter().product::<usize>() / (rows * keys);
    let inputs = vec![
        random("x", shape, DType::F32, 5.0, 8),
        float(
            "mask",
            shape,
            DType::F32,
            causal_mask(rows, keys, lead),
            false,
        ),
    ];
    let run: OpFn = Box::new(|t| ops::softmax_last(&(&t[0] + &t[1])?));
    case("softmax_last", DType::F32, shape, inputs, run)
}

fn attn_softmax(dt: DType, shape: [usize; 4], per_head: bool, cap: Option<f64>) -> Case {
    let [n, h, lq, lk] = shape;
    let bh = if per_head { h } else { 1 };
    let inputs = vec![
        random("scores", &shape, dt, 8.0, 9),
        float(
            "bias",
            &[n, bh, lq, lk],
            DType::F32,
            causal_mask(lq, lk, n * bh),
            false,
        ),
    ];
    let scale = 0.35;
    let run: OpFn = Box::new(move |t| ops::attn_softmax(&t[0], &t[1], scale, cap));
    let mut c = case("attn_softmax", dt, &shape, inputs, run);
    c.reference = Some(Box::new(move |t| {
        let mut s = (&t[0] * scale)?;
        if let Some(c) = cap {
            s = ((s / c)?.tanh()? * c)?;
        }
        ops::softmax_last_chain(&s.broadcast_add(&t[1])?)
    }));
    c
}

fn logprob_and_sum(dt: DType, rows: usize, vocab: usize) -> Case {
    let mut rng = Rng::new(10);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
    let inputs = vec![
        random("logits", &[rows, vocab], dt, 3.0, 11),
        ids("targets", targets),
    ];
    let run: OpFn = Box::new(|t| ops::logprob_and_sum(&t[0], &t[1]));
    let mut c = case("logprob_and_sum", dt, &[rows, vocab], inputs, run);
    c.reference = Some(Box::new(|t| {
        let lp = ops::token_logprobs_chain(&t[0], &t[1])?.unsqueeze(1)?;
        let sums = t[0].detach().sum_keepdim(1)?;
        Tensor::cat(&[lp, sums], 1)
    }));
    c
}

fn token_logprobs(shape: &[usize]) -> Case {
    let vocab = shape[shape.len() - 1] as u32;
    let mut rng = Rng::new(12);
    let n = shape.iter().product::<usize>() / vocab as usize;
    let lead = shape[..shape.len() - 1].to_vec();
    let targets = Input {
        shape: lead,
        ..ids("targets", (0..n).map(|_| rng.below(vocab)).collect())
    };
    let inputs = vec![random("logits", shape, DType::F32, 3.0, 13), targets];
    let run: OpFn = Box::new(|t| ops::token_logprobs(&t[0], &t[1]));
    case("token_logprobs", DType::F32, shape, inputs, run)
}

/// 9 source rows read by 14 output rows: some rows three times, some never, two outputs dead
/// (masked padding: no gradient, so no reader).
fn row_gather(dt: DType, width: usize) -> Case {
    const SRC: usize = 9;
    let index: Vec<u32> = vec![0, 3, 3, 8, 1, 3, 5, 5, 0, 7, 2, 8, 1, 6];
    let dead = [5usize, 12];
    let live = move |j: usize| !dead.contains(&j);
    let shape = [SRC, width];
    let inputs = vec![random("x", &shape, dt, 1.0, 14)];
    let mut weights = Rng::new(15).values(index.len() * width, 1.0);
    for &j in &dead {
        weights[j * width..(j + 1) * width].fill(0.0);
    }
    let ids = index.clone();
    let run: OpFn =
        Box::new(move |t| ops::RowGather::new(ids.clone(), live, SRC, t[0].device())?.apply(&t[0]));
    let mut c = case("row_gather", dt, &shape, inputs, run);
    c.reference = Some(Box::new(move |t| {
        let ids = Tensor::from_slice(&index, index.len(), t[0].device())?;
        t[0].index_select(&ids, 0)
    }));
    c.weights = Some(weights);
    c
}

/// An embedding table's lookup (a dead row among them), alone (backward adds the rows into
/// zeros) and tied to a product with the table (whose gradient comes first: the rows are added
/// into it in place).
fn table_lookup(tied: bool) -> Case {
    const ROWS: usize = 50;
    const WIDTH: usize = 24;
    let ids: Vec<u32> = vec![3, 7, 3, 49, 0, 7, 3, 12, 12, 8, 1, 3];
    let dead = 4usize;
    let mut inputs = vec![random("table", &[ROWS, WIDTH], DType::F32, 1.0, 50)];
    let n_out = ids.len() * WIDTH + if tied { 3 * ROWS } else { 0 };
    let mut weights = Rng::new(51).values(n_out, 1.0);
    weights[dead * WIDTH..(dead + 1) * WIDTH].fill(0.0);
    if tied {
        let x = Rng::new(52).values(3 * WIDTH, 1.0);
        inputs.push(float("x", &[3, WIDTH], DType::F32, x, false));
    }
    let run: OpFn = Box::new(move |t| {
        let lookup = ops::TableLookup::new(&ids, |j| j != dead, t[0].device())?;
        let y = lookup.apply(&t[0])?.flatten_all()?;
        if !tied {
            return Ok(y);
        }
        // Backward takes an addition's (and a cat's) last operand first.
        let z = t[1].matmul(&t[0].t()?)?.flatten_all()?;
        Tensor::cat(&[y, z], 0)
    });
    let op = if tied {
        "table_lookup_tied"
    } else {
        "table_lookup"
    };
    let mut c = case(op, DType::F32, &[ROWS, WIDTH], inputs, run);
    c.weights = Some(weights);
    c
}

fn linear(dt: DType, x_shape: &[usize], out: usize, bias: bool) -> Case {
    let inn = x_shape[x_shape.len() - 1];
    let mut inputs = vec![
        random("x", x_shape, dt, 1.0, 16),
        random("w", &[out, inn], dt, 0.2, 17),
    ];
    if bias {
        inputs.push(random("b", &[out], dt, 1.0, 18));
    }
    let run: OpFn = Box::new(|t| ops::linear(&t[0], &t[1], t.get(2)));
    case("linear", dt, x_shape, inputs, run)
}

/// A product over an NF4 weight (QLoRA's frozen base): quantized on the host, dequantized by
/// the device inside the product and again for the input's gradient; `part` takes rows of it
/// (a fused projection's part). The reference multiplies by the host's dequantization.
fn nf4_linear(
    dt: DType,
    x_shape: &[usize],
    out: usize,
    part: Option<(usize, usize)>,
    double_quant: bool,
) -> Case {
    use crate::model::nf4::{quantize_weight, Nf4Rows};
    let inn = x_shape[x_shape.len() - 1];
    let inputs = vec![
        random("x", x_shape, dt, 1.0, 60),
        float(
            "w",
            &[out, inn],
            dt,
            Rng::new(61).values(out * inn, 0.2),
            false,
        ),
    ];
    let rows = move |w: &Tensor, device: &candle_core::Device| -> Result<Nf4Rows> {
        let q = Nf4Rows::whole(quantize_weight(w, double_quant, device)?);
        Ok(match part {
            Some((start, len)) => q.narrow(start, len)?,
            None => q,
        })
    };
    let run: OpFn = Box::new(move |t| ops::nf4_linear(&t[0], &rows(&t[1], t[0].device())?));
    let reference: OpFn = Box::new(move |t| {
        let w = rows(&t[1], &candle_core::Device::Cpu)?
            .dequantize(DType::F32)?
            .to_dtype(DType::F64)?;
        t[0].broadcast_matmul(&w.t()?)
    });
    let mut c = case("nf4_linear", dt, x_shape, inputs, run);
    c.reference = Some(reference);
    c
}

fn column_sums(dt: DType, shape: &[usize]) -> Case {
    let n = shape.iter().product();
    let inputs = vec![float("t", shape, dt, Rng::new(19).values(n, 1.0), false)];
    let mut c = case(
        "column_sums",
        dt,
        shape,
        inputs,
        Box::new(|t| ops::column_sums(&t[0])),
    );
    // Not `column_sums` on f64: it would sum a non-f32 tensor in f32 blocks.
    c.reference = Some(Box::new(|t| t[0].sum(0)));
    c
}

fn rotary(shape: &[usize], half: usize) -> Case {
    let positions = shape[1];
    let angles = Rng::new(20).values(positions * half, 3.0);
    let cos = angles.iter().map(|a| a.cos()).collect();
    let sin = angles.iter().map(|a| a.sin()).collect();
    let inputs = vec![
        random("x", shape, DType::F32, 1.0, 21),
        float("cos", &[positions, half], DType::F32, cos, false),
        float("sin", &[positions, half], DType::F32, sin, false),
    ];
    let run: OpFn = Box::new(|t| ops::rotary(&t[0], &t[1], &t[2]));
    case("rotary", DType::F32, shape, inputs, run)
}

fn relu(shape: &[usize]) -> Case {
    let inputs = vec![random("x", shape, DType::F32, 1.0, 22)];
    case(
        "relu",
        DType::F32,
        shape,
        inputs,
        Box::new(|t| ops::relu(&t[0])),
    )
}

/// An f32 weight's bf16 copy: the copy rounds, its gradient comes back (in bf16).
fn bf16_copy(shape: &[usize]) -> Case {
    let inputs = vec![random("w", shape, DType::F32, 1.0, 23)];
    let mut c = case(
        "bf16_copy",
        DType::BF16,
        shape,
        inputs,
        Box::new(|t| ops::bf16_copy(&t[0])),
    );
    c.reference = Some(Box::new(|t| Ok(t[0].clone())));
    c
}

/// The odds term's coefficients from mean log-probs (chosen, then rejected).
fn odds_coefficients(pairs: usize) -> Case {
    let lp = Rng::new(24)
        .values(2 * pairs, 1.5)
        .iter()
        .map(|v| v - 1.6)
        .collect();
    let inputs = vec![float("lp", &[2 * pairs], DType::F32, lp, false)];
    let run: OpFn = Box::new(|t| crate::train::odds_coefs::odds_coefficients(&t[0], 0.1));
    let mut c = case("odds_coefficients", DType::F32, &[2 * pairs], inputs, run);
    c.tolerance = 1e-5;
    c
}

/// The global gradient norm over tensors of several sizes (one past the CUDA kernel's 1,024
/// blocks, so its threads loop) and both dtypes.
fn norm_of_gradients() -> Case {
    let shapes: [(&'static str, usize, DType); 4] = [
        ("a", 1, DType::F32),
        ("b", 1000, DType::F32),
        ("c", (5 << 20) + 3, DType::F32),
        ("d", 4099, DType::BF16),
    ];
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(i, &(name, n, dt))| {
            float(
                name,
                &[n],
                dt,
                Rng::new(25 + i as u64).values(n, 1.0),
                false,
            )
        })
        .collect();
    let run: OpFn = Box::new(move |t| {
        let grads: HashMap<String, Tensor> = shapes
            .iter()
            .zip(t)
            .map(|(&(name, _, _), g)| (name.to_string(), g.clone()))
            .collect();
        Tensor::new(&[global_norm(&grads)?], &candle_core::Device::Cpu)
    });
    let mut c = case("global_norm", DType::F32, &[shapes.len()], inputs, run);
    // Not `global_norm` on f64: its candle-op path squares in f32.
    c.reference = Some(Box::new(|t| {
        let mut total = 0f64;
        for g in t {
            total += g.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        Tensor::new(&[total.sqrt()], &candle_core::Device::Cpu)
    }));
    c
}

/// Two AdamW steps (a decayed weight over several blocks, an undecayed norm weight), gradients
/// in `grad_dtype`; the result is each parameter's change. With `eight_bit`, bitsandbytes'
/// 8-bit AdamW: the weight's moments in 8 bits (a short last block of 256), the norm's f32;
/// its reference is the same update on the CPU in f32, which the kernel equals bit for bit.
fn adamw(grad_dtype: DType, eight_bit: bool) -> Case {
    let params: [(&'static str, usize); 2] = [
        ("layers.0.mlp.weight", 70_003),
        ("layers.0.norm.weight", 33),
    ];
    let mut inputs = Vec::new();
    for (i, &(_, n)) in params.iter().enumerate() {
        let p = Rng::new(30 + i as u64).values(n, 0.1);
        inputs.push(float("p", &[n], DType::F32, p, false));
        inputs.push(float(
            "g",
            &[n],
            grad_dtype,
            Rng::new(40 + i as u64).values(n, 1.0),
            false,
        ));
    }
    let steps = move |t: &[Tensor]| -> Result<Tensor> {
        let mut vars = Params::default();
        let mut grads = HashMap::new();
        for (i, &(name, _)) in params.iter().enumerate() {
            vars.insert(name.to_string(), Var::from_tensor(&t[2 * i].copy()?)?);
            grads.insert(name.to_string(), t[2 * i + 1].clone());
        }
        let mut opt = AdamW::new(AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            eight_bit,
        });
        opt.step(&vars, &grads, 1e-2, 0.5)?;
        let halved: HashMap<String, Tensor> = grads
            .iter()
            .map(|(k, g)| Ok((k.clone(), (g * 0.5)?)))
            .collect::<Result<_>>()?;
        opt.step(&vars, &halved, 1e-2, 1.0)?;
        let changes = params
            .iter()
            .enumerate()
            .map(|(i, &(name, _))| {
                let p = vars.get(name).map(|v| v.as_tensor().clone());
                let p = p.ok_or_else(|| candle_core::Error::Msg(format!("{name} lost")))?;
                p - &t[2 * i]
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&changes, D::Minus1)
    };
    let run: OpFn = Box::new(steps);
    let name = if eight_bit { "adamw8bit" } else { "adamw" };
    let mut c = case(name, grad_dtype, &[70_003 + 33], inputs, run);
    if eight_bit {
        // The f64 inputs hold f32 values: the update in f32 on the CPU.
        c.reference = Some(Box::new(move |t| {
            let t32 = t
                .iter()
                .map(|x| x.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()?;
            steps(&t32)
        }));
    }
    // The f32 update is held to f32's tolerance whatever the gradient's dtype: bf16 gradients
    // widen exactly.
    c.tolerance = F32_TOL;
    c
}

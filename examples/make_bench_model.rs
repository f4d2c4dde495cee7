//! Writes a randomly initialised checkpoint with a real model's shape, for benchmarks:
//! `cargo run --release --example make_bench_model -- opt-125m OUT_DIR`.
//!
//! The same shapes as the project's shared `make_bench_model.py` (OPT-125M: vocab 50272,
//! hidden 768, 12 layers, 12 heads, ffn 3072, tied head), weights drawn from N(0, 0.02) as
//! transformers initialises OPT, LayerNorms at 1/0, biases 0; GPT-2's tokenizer with OPT's
//! special tokens from `examples/bench/gpt2-tokenizer`.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    ffn: usize,
}

fn shape(name: &str) -> Option<Shape> {
    match name {
        "opt-125m" => Some(Shape {
            hidden: 768,
            layers: 12,
            heads: 12,
            ffn: 3072,
        }),
        "opt-350m-pre-norm" => Some(Shape {
            hidden: 1024,
            layers: 24,
            heads: 16,
            ffn: 4096,
        }),
        "opt-1.3b" => Some(Shape {
            hidden: 2048,
            layers: 24,
            heads: 32,
            ffn: 8192,
        }),
        _ => None,
    }
}

fn normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller: enough for benchmark weights.
            let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
            let u2: f32 = rng.gen();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(out)) = (args.first(), args.get(1)) else {
        return Err(
            "usage: make_bench_model SHAPE OUT_DIR (SHAPE: opt-125m, opt-350m-pre-norm, opt-1.3b)"
                .into(),
        );
    };
    let s = shape(name).ok_or_else(|| format!("unknown shape `{name}`"))?;
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let vocab = 50272;
    let max_pos = 2048;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, data: Vec<f32>, dims: &[usize]| -> candle_core::Result<()> {
        t.insert(name, Tensor::from_vec(data, dims, &dev)?);
        Ok(())
    };
    let h = s.hidden;
    let p = "model.decoder";
    add(
        format!("{p}.embed_tokens.weight"),
        normal(&mut rng, vocab * h, 0.02),
        &[vocab, h],
    )?;
    add(
        format!("{p}.embed_positions.weight"),
        normal(&mut rng, (max_pos + 2) * h, 0.02),
        &[max_pos + 2, h],
    )?;
    add(format!("{p}.final_layer_norm.weight"), vec![1.0; h], &[h])?;
    add(format!("{p}.final_layer_norm.bias"), vec![0.0; h], &[h])?;
    for l in 0..s.layers {
        let lp = format!("{p}.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(
                format!("{lp}.self_attn.{proj}.weight"),
                normal(&mut rng, h * h, 0.02),
                &[h, h],
            )?;
            add(format!("{lp}.self_attn.{proj}.bias"), vec![0.0; h], &[h])?;
        }
        add(
            format!("{lp}.fc1.weight"),
            normal(&mut rng, s.ffn * h, 0.02),
            &[s.ffn, h],
        )?;
        add(format!("{lp}.fc1.bias"), vec![0.0; s.ffn], &[s.ffn])?;
        add(
            format!("{lp}.fc2.weight"),
            normal(&mut rng, h * s.ffn, 0.02),
            &[h, s.ffn],
        )?;
        add(format!("{lp}.fc2.bias"), vec![0.0; h], &[h])?;
        for norm in ["self_attn_layer_norm", "final_layer_norm"] {
            add(format!("{lp}.{norm}.weight"), vec![1.0; h], &[h])?;
            add(format!("{lp}.{norm}.bias"), vec![0.0; h], &[h])?;
        }
    }
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "ffn_dim": s.ffn, "max_position_embeddings": max_pos,
        "word_embed_proj_dim": h, "do_layer_norm_before": true, "dropout": 0.1,
        "attention_dropout": 0.0, "enable_bias": true, "layer_norm_elementwise_affine": true,
        "tie_word_embeddings": true, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
        "dtype": "float32",
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench/gpt2-tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), out.join(f))?;
    }
    println!("{name}: wrote {}", out.display());
    Ok(())
}

//! Writes a randomly initialised checkpoint with a real model's shape, for benchmarks:
//! `cargo run --release --example make_bench_model -- opt-125m OUT_DIR`.
//!
//! `llama-1b` and `mistral-7b` follow the shared `make_bench_model.py` too (Llama-3.2-1B's body:
//! vocab 128256, hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, tied embeddings,
//! rope_theta 500000, RMS eps 1e-5; Mistral-7B's body with the benchmark's GPT-2 vocabulary:
//! vocab 50272, hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, untied head,
//! rope_theta 10000, no sliding window). They are written as bf16 safetensors straight to disk,
//! in parallel on every core with a xorshift generator (uniform weights with N(0, 0.02)'s
//! standard deviation, RMSNorm weights 1), so the 14.5 GB Mistral file takes seconds, not
//! minutes. `--layers N` overrides the layer count (a small stand-in with the real widths, for
//! testing that the files load).
//!
//! The same shapes as the project's shared `make_bench_model.py` (OPT-125M: vocab 50272,
//! hidden 768, 12 layers, 12 heads, ffn 3072, tied head), weights drawn from N(0, 0.02) as
//! transformers initialises OPT, LayerNorms at 1/0, biases 0; GPT-2's tokenizer with OPT's
//! special tokens from `examples/bench/gpt2-tokenizer`.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// A Llama-family shape of the shared `make_bench_model.py` (transformers' config defaults
/// filled in where that script leaves them).
struct LlamaShape {
    arch: &'static str,
    model_type: &'static str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    max_pos: usize,
    rope_theta: f64,
    rms_eps: f64,
    tied: bool,
}

fn llama_shape(name: &str) -> Option<LlamaShape> {
    match name {
        "llama-1b" => Some(LlamaShape {
            arch: "LlamaForCausalLM",
            model_type: "llama",
            vocab: 128256,
            hidden: 2048,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            intermediate: 8192,
            max_pos: 131072,
            rope_theta: 500000.0,
            rms_eps: 1e-5,
            tied: true,
        }),
        "mistral-7b" => Some(LlamaShape {
            arch: "MistralForCausalLM",
            model_type: "mistral",
            vocab: 50272,
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            intermediate: 14336,
            max_pos: 32768,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            tied: false,
        }),
        _ => None,
    }
}

/// One tensor of the file: normal-like random weights or ones (RMSNorm).
struct Entry {
    name: String,
    shape: Vec<usize>,
    ones: bool,
}

fn llama_entries(s: &LlamaShape) -> Vec<Entry> {
    let (h, hd) = (s.hidden, s.hidden / s.heads);
    let mut e = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, ones: bool| e.push(Entry { name, shape, ones });
    add("model.embed_tokens.weight".into(), vec![s.vocab, h], false);
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![s.heads * hd, h],
            false,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![s.kv_heads * hd, h],
            false,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![s.kv_heads * hd, h],
            false,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, s.heads * hd],
            false,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![s.intermediate, h],
            false,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![s.intermediate, h],
            false,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, s.intermediate],
            false,
        );
        add(format!("{p}.input_layernorm.weight"), vec![h], true);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        );
    }
    add("model.norm.weight".into(), vec![h], true);
    if !s.tied {
        add("lm_head.weight".into(), vec![s.vocab, h], false);
    }
    e
}

/// Writes `entries` as one bf16 safetensors file, generating and writing chunks of 8M
/// elements on every core (positional writes into the preallocated file).
fn write_bf16_safetensors(path: &Path, entries: &[Entry], std: f32) -> std::io::Result<usize> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut spans = Vec::new();
    for e in entries {
        let n: usize = e.shape.iter().product();
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": e.shape, "data_offsets": [offset, offset + 2 * n]}),
        );
        spans.push((offset, n, e.ones));
        offset += 2 * n;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let base = 8 + head.len();
    let file = std::fs::File::create(path)?;
    file.set_len((base + offset) as u64)?;
    file.write_all_at(&(head.len() as u64).to_le_bytes(), 0)?;
    file.write_all_at(&head, 8)?;
    const CHUNK: usize = 8 << 20;
    let mut jobs = Vec::new(); // (byte offset in data, elements, ones)
    for &(off, n, ones) in &spans {
        let mut done = 0;
        while done < n {
            let k = CHUNK.min(n - done);
            jobs.push((off + 2 * done, k, ones));
            done += k;
        }
    }
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = std * 3f32.sqrt();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|sc| -> std::io::Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| -> std::io::Result<()> {
                    let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK);
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(off, n, ones)) = jobs.get(j) else {
                            return Ok(());
                        };
                        buf.clear();
                        if ones {
                            let one = half::bf16::ONE.to_bits().to_le_bytes();
                            for _ in 0..n {
                                buf.extend_from_slice(&one);
                            }
                        } else {
                            // xorshift64*, seeded per chunk: deterministic whatever the thread count.
                            let mut x = (j as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                            let scale = 2.0 * a / (1u64 << 32) as f32;
                            let mut left = n;
                            while left > 0 {
                                x ^= x >> 12;
                                x ^= x << 25;
                                x ^= x >> 27;
                                let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
                                for half_word in [r as u32, (r >> 32) as u32] {
                                    if left == 0 {
                                        break;
                                    }
                                    let v = half_word as f32 * scale - a;
                                    buf.extend_from_slice(
                                        &half::bf16::from_f32(v).to_bits().to_le_bytes(),
                                    );
                                    left -= 1;
                                }
                            }
                        }
                        file.write_all_at(&buf, (base + off) as u64)?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer thread panicked")?;
        }
        Ok(())
    })?;
    Ok(offset / 2)
}

fn write_llama(name: &str, s: &LlamaShape, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = std::time::Instant::now();
    let entries = llama_entries(s);
    let params = write_bf16_safetensors(&out.join("model.safetensors"), &entries, 0.02)?;
    let config = serde_json::json!({
        "architectures": [s.arch], "model_type": s.model_type, "vocab_size": s.vocab,
        "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.hidden / s.heads,
        "max_position_embeddings": s.max_pos, "rope_theta": s.rope_theta,
        "rms_norm_eps": s.rms_eps, "tie_word_embeddings": s.tied, "hidden_act": "silu",
        "attention_bias": false, "attention_dropout": 0.0, "mlp_bias": false,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": null, "use_cache": true, "dtype": "bfloat16",
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    copy_tokenizer(out)?;
    println!(
        "{name}: {:.1}M parameters (bf16) -> {} in {:.1} s",
        params as f64 / 1e6,
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn copy_tokenizer(out: &Path) -> std::io::Result<()> {
    // $BENCH_TOKENIZER, else the source tree's copy, else `examples/bench/gpt2-tokenizer` under
    // the current directory (the binary may run where the source tree is not, e.g. the GPU
    // machine, from the repository root).
    let tok = std::env::var_os("BENCH_TOKENIZER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench/gpt2-tokenizer");
            if src.is_dir() {
                src
            } else {
                Path::new("examples/bench/gpt2-tokenizer").to_path_buf()
            }
        });
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), out.join(f))?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(out)) = (args.first(), args.get(1)) else {
        return Err(
            "usage: make_bench_model SHAPE OUT_DIR [--layers N] (SHAPE: opt-125m, \
             opt-350m-pre-norm, opt-1.3b, llama-1b, mistral-7b)"
                .into(),
        );
    };
    let layers = match (args.get(2).map(String::as_str), args.get(3)) {
        (Some("--layers"), Some(n)) => Some(n.parse::<usize>()?),
        (None, _) => None,
        _ => return Err("expected `--layers N` after OUT_DIR".into()),
    };
    let out = Path::new(out);
    if let Some(mut ls) = llama_shape(name) {
        std::fs::create_dir_all(out)?;
        if let Some(n) = layers {
            ls.layers = n;
        }
        return write_llama(name, &ls, out);
    }
    let mut s = shape(name).ok_or_else(|| format!("unknown shape `{name}`"))?;
    if let Some(n) = layers {
        s.layers = n;
    }
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
    copy_tokenizer(out)?;
    println!("{name}: wrote {}", out.display());
    Ok(())
}

//! Memory accounting (`orpo::memory`) with its counting allocator installed, as the binary
//! installs it, and what it guards: a training step leaves nothing behind. The tests share
//! the process-wide counters and the kernels switch, so they take turns (`SERIAL`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use orpo::config::Config;
use orpo::memory::{CountingAlloc, MemoryMeter};
use orpo::train::load_trainer;
use orpo::train::optim::{AdamW, AdamWSettings};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn the_cpu_meter_counts_a_tensor_and_its_peak() {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let meter = MemoryMeter::new(&Device::Cpu).expect("the counting allocator is installed");
    // 64 MiB against a 4 MiB margin: the harness's own threads allocate and free a little
    // beside this test (the counters are process-wide).
    let (size, margin) = (64u64 << 20, 4u64 << 20);
    let before = meter.read();
    let t = Tensor::zeros(1 << 24, DType::F32, &Device::Cpu).unwrap();
    let held = meter.read();
    assert!(
        held.now + margin >= before.now + size,
        "{before:?} -> {held:?}"
    );
    drop(t);
    let after = meter.read();
    assert!(
        after.now + size <= held.now + margin,
        "{held:?} -> {after:?}"
    );
    assert!(
        after.peak >= held.now,
        "the window's peak holds the freed tensor: {after:?}"
    );
    let next = meter.read();
    assert!(
        next.peak + size <= held.now + margin,
        "a new window starts below it: {next:?}"
    );
}

/// Steps 2..5 of a Llama-family model on the plain-op path (the ops and optimizer that CUDA
/// runs) end with the same bytes in use: no gradient keeps the step's graph alive. A weight
/// gradient computed in an op's backward from the tracked input once did, and the optimizer's
/// moments, built from it with candle ops, chained every step's activations to the next.
#[test]
fn training_steps_leave_nothing_behind() {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let was = orpo::ops::fused_kernels();
    orpo::ops::set_fused_kernels(false);
    let result = std::panic::catch_unwind(|| {
        for model in ["tiny-llama3", "tiny-opt"] {
            steps_leave_nothing_behind(model);
        }
    });
    orpo::ops::set_fused_kernels(was);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn steps_leave_nothing_behind(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/explicit-10.jsonl");
    let sets = [
        format!("model.id={}", model_dir(model).display()),
        format!("train.output_dir={}", tmp.path().display()),
        format!("data.train={}", data.display()),
        "train.batch_size=2".to_string(),
        "optim.lr=1e-3".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
    ];
    let config = Config::from_toml_str("", "test.toml", &sets).unwrap();
    let trainer = load_trainer(&config).unwrap();
    let meter = MemoryMeter::new(&Device::Cpu).unwrap();
    let plan = trainer.plan();
    let mut opt = AdamW::new(AdamWSettings {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        eight_bit: false,
    });
    let mut live = Vec::new();
    for step in 0..5 {
        let sb = plan.step(step);
        let g = trainer.step_gradients(&sb.micro_batches, None).unwrap();
        for (name, grad) in &g.grads {
            assert!(
                !grad.track_op(),
                "{model}: the gradient of {name} carries a graph"
            );
        }
        opt.step(trainer.model.params(), &g.grads, 1e-3, 1.0)
            .unwrap();
        drop(g);
        live.push(meter.read().now);
    }
    // Step 1 creates the moments; later steps allocate and free the same. A 4 MiB margin for
    // the harness's own threads and gemm's packing buffer, which each thread allocates once,
    // the first time it packs a product (on a loaded machine a worker may first do so in step
    // 3: +2 MiB, seen); a leak here grew ~5 MB a step.
    let (lo, hi) = (live[1..].iter().min(), live[1..].iter().max());
    assert!(
        hi.zip(lo).is_some_and(|(hi, lo)| hi - lo <= 4 << 20),
        "{model}: bytes in use after each step {live:?}"
    );
}

/// A product over a 4-bit weight keeps only its input for the backward: the dequantized
/// weight (16 MiB in f32 here) is freed when the forward returns, and made again for `dx`.
/// The same product through a dequantized tensor holds it until the graph goes.
#[test]
fn a_quantized_product_keeps_no_dequantized_weight() {
    use orpo::model::nf4::{quantize_weight, Nf4Rows};
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let meter = MemoryMeter::new(&Device::Cpu).expect("the counting allocator is installed");
    let (size, margin) = (16u64 << 20, 4u64 << 20);
    let w = Tensor::randn(0f32, 1.0, (2048, 2048), &Device::Cpu).unwrap();
    let q = Nf4Rows::whole(quantize_weight(&w, false, &Device::Cpu).unwrap());
    drop(w);
    let x = candle_core::Var::randn(0f32, 1.0, (4, 2048), &Device::Cpu).unwrap();
    // gemm's per-thread packing buffers, allocated by a first product, stay.
    drop(orpo::ops::nf4_linear(x.as_tensor(), &q).unwrap());
    let before = meter.read();
    let y = orpo::ops::nf4_linear(x.as_tensor(), &q).unwrap();
    let held = meter.read();
    assert!(held.now < before.now + margin, "{before:?} -> {held:?}");
    assert!(
        held.peak + margin >= before.now + size,
        "the product dequantized: {held:?}"
    );
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    drop((y, grads));

    let before = meter.read();
    let dense = q.dequantize(DType::F32).unwrap();
    let y = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
    drop(dense);
    let held = meter.read();
    assert!(
        held.now + margin >= before.now + size,
        "{before:?} -> {held:?}"
    );
    drop(y);
}

/// `orpo merge` to bf16 holds the merged model in bf16 and reads its base a tensor at a time:
/// an OPT base of 13.4M parameters (54 MB in f32) merges with a peak below its f32 size (the
/// bf16 model and one tensor's merge, ~40 MB), where loading it whole in f32 and converting
/// for the save held both (~80 MB). The saved weights equal the f32 merge's, rounded.
#[test]
fn a_bf16_merge_never_holds_the_f32_model() {
    use candle_core::safetensors::{load, save};
    use orpo::config::SaveDtype;
    use std::collections::HashMap;
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&adapter).unwrap();
    // tiny-opt widened 8x (hidden 512, ffn 2048), four layers.
    let tiny = model_dir("tiny-opt");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if tiny.join(f).is_file() {
            std::fs::copy(tiny.join(f), base.join(f)).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", 512),
        ("word_embed_proj_dim", 512),
        ("ffn_dim", 2048),
        ("num_hidden_layers", 4),
    ] {
        config[k] = v.into();
    }
    config["dtype"] = "float32".into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    let tiny_weights = load(tiny.join("model.safetensors"), &Device::Cpu).unwrap();
    let widen = |d: usize| match d {
        64 => 512,
        256 => 2048,
        d => d,
    };
    let mut weights = HashMap::new();
    let mut params = 0;
    for (name, t) in &tiny_weights {
        // Layers 0 and 1 also as 2 and 3.
        let names = match name.contains(".layers.") {
            true => vec![
                name.clone(),
                name.replace(".layers.0.", ".layers.2.")
                    .replace(".layers.1.", ".layers.3."),
            ],
            false => vec![name.clone()],
        };
        for name in names {
            let shape: Vec<usize> = t.dims().iter().map(|&d| widen(d)).collect();
            params += shape.iter().product::<usize>();
            let w = Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap();
            weights.insert(name, w);
        }
    }
    save(&weights, base.join("model.safetensors")).unwrap();
    drop(weights);
    // A LoRA adapter (PEFT's names) on every layer's q_proj and fc1.
    let mut lora = HashMap::new();
    for layer in 0..4 {
        for (module, out_f) in [("self_attn.q_proj", 512), ("fc1", 2048)] {
            let p = format!("base_model.model.model.decoder.layers.{layer}.{module}");
            let a = Tensor::randn(0f32, 0.1, (8, 512), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 0.1, (out_f, 8), &Device::Cpu).unwrap();
            lora.insert(format!("{p}.lora_A.weight"), a);
            lora.insert(format!("{p}.lora_B.weight"), b);
        }
    }
    save(&lora, adapter.join("adapter_model.safetensors")).unwrap();
    let adapter_config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "fc1"], "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": base.to_string_lossy(),
    });
    std::fs::write(
        adapter.join("adapter_config.json"),
        adapter_config.to_string(),
    )
    .unwrap();

    let meter = MemoryMeter::new(&Device::Cpu).expect("the counting allocator is installed");
    let (bf16, f32) = (tmp.path().join("bf16"), tmp.path().join("f32"));
    meter.read();
    orpo::merge::merge(None, &adapter, &bf16, false, SaveDtype::Bf16).unwrap();
    let peak = meter.read().peak;
    let f32_bytes = 4 * params as u64;
    assert!(f32_bytes > 50 << 20, "{params} parameters");
    assert!(
        peak < f32_bytes,
        "a bf16 merge of a {f32_bytes}-byte f32 model peaked at {peak} bytes"
    );
    orpo::merge::merge(None, &adapter, &f32, false, SaveDtype::F32).unwrap();
    let (half, full) = (
        load(bf16.join("model.safetensors"), &Device::Cpu).unwrap(),
        load(f32.join("model.safetensors"), &Device::Cpu).unwrap(),
    );
    assert_eq!(half.len(), full.len());
    for (name, t) in &full {
        let a = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = half[name].to_dtype(DType::F32).unwrap();
        assert_eq!(half[name].dtype(), DType::BF16, "{name}");
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

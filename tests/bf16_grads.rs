//! Under bf16 products an f32 weight's bf16 copy keeps its gradient in bf16
//! (`ops::bf16_copy`): training gives the same log and the same saved weights, bit for bit, as
//! the plain cast whose gradient is widened to f32, with gradient accumulation, gradient
//! checkpointing, LoRA, and on both op paths (CPU kernels on and off). One test: the switches
//! are process-wide.

mod common;

use common::*;
use orpo::config::Config;
use orpo::train::load_trainer;
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn config(model: &str, out: &Path, extra: &[&str]) -> Config {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/explicit-10.jsonl");
    let mut sets = vec![
        format!("model.id={}", model_dir(model).display()),
        "model.dtype=bf16".to_string(),
        format!("train.output_dir={}", out.display()),
        format!("data.train={}", data.display()),
        "train.max_steps=3".to_string(),
        "train.log_every=1".to_string(),
        "train.batch_size=2".to_string(),
        "optim.lr=1e-3".to_string(),
        "optim.weight_decay=0.1".to_string(),
        "optim.max_grad_norm=0.5".to_string(),
        "data.max_length=256".to_string(),
        "data.max_prompt_length=192".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::from_toml_str("", "test.toml", &sets).unwrap()
}

/// The run's log without timings, and its saved weights.
fn train(config: &Config, out: &Path) -> (Vec<serde_json::Value>, Vec<u8>) {
    let mut trainer = load_trainer(config).unwrap();
    trainer.run(None, &AtomicBool::new(false)).unwrap();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let log = log
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v
        })
        .collect();
    let weights = ["model.safetensors", "adapter_model.safetensors"]
        .iter()
        .map(|f| out.join(f))
        .find(|p| p.is_file())
        .expect("saved weights");
    (log, std::fs::read(weights).unwrap())
}

#[test]
fn narrow_weight_gradients_train_bit_for_bit_as_widened_ones() {
    let cases: [(&str, &[&str]); 5] = [
        ("tiny-llama3", &[]),
        ("tiny-llama3", &["train.grad_accum=2"]),
        ("tiny-llama3", &["train.gradient_checkpointing=true"]),
        (
            "tiny-llama3",
            &["lora.enabled=true", "lora.r=4", "lora.alpha=8"],
        ),
        ("tiny-opt", &[]),
    ];
    for kernels in [true, false] {
        orpo::ops::set_fused_kernels(kernels);
        for (model, extra) in cases {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            orpo::ops::set_narrow_weight_grads(true);
            let cfg = config(model, a.path(), extra);
            // Not vacuous: some weight's gradient is bf16 here (accumulated ones add in f32).
            let trainer = load_trainer(&cfg).unwrap();
            let sb = trainer.plan().step(0);
            let in_place = orpo::ops::TableLookup::added_in_place();
            let g = trainer.step_gradients(&sb.micro_batches, None).unwrap();
            // Both fixtures tie their embeddings: fully trained, the table's rows are added
            // into the head's (widened) gradient in place, once per micro-batch. Under
            // checkpointing the head's gradient comes after backward (a side gradient), so
            // the rows go into zeros; under LoRA the table is frozen.
            let added = orpo::ops::TableLookup::added_in_place() - in_place;
            let no_head_grad_yet = extra
                .iter()
                .any(|e| e.starts_with("lora") || e.starts_with("train.gradient_checkpointing"));
            let want = if no_head_grad_yet {
                0
            } else {
                sb.micro_batches.len()
            };
            assert_eq!(added, want, "{model} {extra:?}: lookups added in place");
            let accumulated = sb.micro_batches.len() > 1;
            assert!(
                accumulated
                    || g.grads
                        .values()
                        .any(|t| t.dtype() == candle_core::DType::BF16),
                "{model} {extra:?}: no bf16 gradient"
            );
            drop((g, trainer));
            let narrow = train(&cfg, a.path());
            orpo::ops::set_narrow_weight_grads(false);
            let widened = train(&config(model, b.path(), extra), b.path());
            assert_eq!(narrow.0.len(), 3, "{model} {extra:?}");
            assert_eq!(narrow.0, widened.0, "{model} {extra:?} kernels {kernels}");
            assert!(
                narrow.1 == widened.1,
                "{model} {extra:?} kernels {kernels}: saved weights differ"
            );
        }
    }
    orpo::ops::set_narrow_weight_grads(true);
    orpo::ops::set_fused_kernels(true);
}

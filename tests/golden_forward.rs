//! Numbers at the initial weights against TRL's goldens: per-pair loss and metrics, and the
//! first batch's per-parameter gradient norms (which prove no gradient is silently dropped).

mod common;

use candle_core::backprop::GradStore;
use candle_core::Device;
use common::*;
use orpo::data::TokenizedPair;
use orpo::model::CausalLm;
use orpo::train::batch::collate;
use orpo::train::forward::forward;
use orpo::train::loss::METRIC_NAMES;

fn pad_id(g: &serde_json::Value) -> u32 {
    g["pad_token_id"].as_u64().unwrap() as u32
}

#[test]
fn per_pair_loss_and_metrics_match_trl() {
    for name in MODELS {
        let g = golden(name);
        let model = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        let beta = g["settings"]["beta"].as_f64().unwrap();
        let pairs = golden_pairs(&g, "tokenized");
        for (i, (pair, want)) in pairs
            .iter()
            .zip(g["initial_per_pair"].as_array().unwrap())
            .enumerate()
        {
            let batch = collate(
                &[pair],
                pad_id(&g),
                true,
                model.packed_padding(),
                &Device::Cpu,
            )
            .unwrap();
            let out = forward(&model, &batch, beta).unwrap();
            assert_close(
                &format!("{name} pair {i} loss"),
                out.readout.metrics(None).unwrap().loss,
                want["loss"].as_f64().unwrap(),
                1e-4,
                1e-6,
            );
            for key in METRIC_NAMES {
                let w = want[key].as_f64().unwrap();
                let got = out.readout.metrics(None).unwrap().get(key).unwrap();
                assert_close(&format!("{name} pair {i} {key}"), got, w, 1e-4, 2e-6);
            }
        }
    }
}

#[test]
fn first_batch_gradient_norms_match_trl() {
    for name in MODELS {
        let model = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        check_first_batch(name, &model, &golden(name));
    }
}

/// The golden's first batch through `model`: its loss, and every parameter's gradient norm
/// (none only where TRL's is exactly 0: LoRA's A while B is zeros).
fn check_first_batch(label: &str, model: &CausalLm, g: &serde_json::Value) {
    let beta = g["settings"]["beta"].as_f64().unwrap();
    let bsz = g["settings"]["batch"].as_u64().unwrap() as usize;
    let pairs = golden_pairs(g, "tokenized");
    let refs: Vec<_> = pairs.iter().take(bsz).collect();
    let batch = collate(&refs, pad_id(g), true, model.packed_padding(), &Device::Cpu).unwrap();
    let out = forward(model, &batch, beta).unwrap();
    let want = &g["initial_first_batch"];
    assert_close(
        &format!("{label} batch loss"),
        out.readout.metrics(None).unwrap().loss,
        want["loss"].as_f64().unwrap(),
        1e-4,
        1e-6,
    );
    let grads = out.objective.backward().unwrap();
    let norms = want["grad_norm_by_param"].as_object().unwrap();
    assert_eq!(
        norms.len(),
        model.params().len(),
        "{label}: parameter count"
    );
    for (pname, w) in norms {
        let var = model
            .params()
            .get(pname)
            .unwrap_or_else(|| panic!("{label}: no parameter {pname}"));
        let w = w.as_f64().unwrap();
        let got = match grads.get(var.as_tensor()) {
            Some(gt) => gt
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt() as f64,
            None if w == 0.0 => 0.0,
            None => panic!("{label}: no gradient for {pname}"),
        };
        assert_close(&format!("{label} grad {pname}"), got, w, 1e-3, 1e-7);
    }
}

/// The first batch's loss and every adapter parameter's gradient norm against TRL with PEFT,
/// for each LoRA golden (QLoRA's on a bitsandbytes 4-bit base): the adapter TRL trained is the
/// one orpo draws from train.seed 42.
#[test]
fn lora_and_dora_first_batch_gradient_norms_match_trl() {
    use orpo::model::lora::{AdapterInit, LoraSpec, TargetPattern, Targets};
    use orpo::model::LoadOptions;
    for (name, file) in [
        ("tiny-opt", "tiny-opt.lora.trl.json"),
        ("tiny-qwen2", "tiny-qwen2.lora-rslora.trl.json"),
        ("tiny-opt", "tiny-opt.dora.trl.json"),
        ("tiny-llama3", "tiny-llama3.dora-pattern.trl.json"),
        ("tiny-opt", "tiny-opt.qlora.trl.json"),
        ("tiny-llama3", "tiny-llama3.qlora-dq.trl.json"),
    ] {
        let path = fixtures().join("golden/extra").join(file);
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let l = &g["lora"];
        let targets = match &l["target_modules"] {
            serde_json::Value::String(p) => Targets::Pattern(TargetPattern::new(p).unwrap()),
            list => Targets::Modules(
                list.as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap().to_string())
                    .collect(),
            ),
        };
        let spec = LoraSpec {
            r: l["r"].as_u64().unwrap() as usize,
            alpha: l["lora_alpha"].as_f64().unwrap(),
            dropout: 0.0,
            use_rslora: l["use_rslora"].as_bool().unwrap(),
            use_dora: l["use_dora"].as_bool().unwrap(),
            targets,
        };
        let s = &g["settings"];
        let opts = LoadOptions {
            lora: Some((spec, AdapterInit::Fresh { seed: 42 })),
            quantize: (s["quant"].as_str() == Some("nf4")).then_some(orpo::model::Quantize {
                double_quant: s["double_quant"].as_i64() == Some(1),
            }),
            ..LoadOptions::default()
        };
        let model = CausalLm::load_with(&model_dir(name), &Device::Cpu, opts).unwrap();
        check_first_batch(file, &model, &g);
    }
}

/// The same for an adapter trained on from a saved one (`lora.init_from`): its B is far from
/// zero, so every A has a gradient.
#[test]
fn a_continued_adapters_first_batch_gradient_norms_match_trl() {
    let path = fixtures().join("golden/extra/tiny-opt.lora-continued.trl.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let saved =
        orpo::model::lora::read_adapter(&fixtures().join("adapters/tiny-opt-orpo3"), &Device::Cpu)
            .unwrap();
    let opts = orpo::model::LoadOptions {
        lora: Some((
            saved.spec,
            orpo::model::lora::AdapterInit::Saved(saved.tensors),
        )),
        ..orpo::model::LoadOptions::default()
    };
    let model = CausalLm::load_with(&model_dir("tiny-opt"), &Device::Cpu, opts).unwrap();
    check_first_batch("tiny-opt.lora-continued", &model, &g);
}

/// The packed batch (`forward` on `model`) against the padded one (`forward_padded` on
/// `reference`, the same weights): loss, metrics and every parameter gradient, with
/// nll_on_prompt both ways; rejected sequences must read the prompt from their chosen
/// sequence's rows.
fn assert_packed_matches_padded(
    name: &str,
    model: &CausalLm,
    reference: &CausalLm,
    pad: u32,
    refs: &[&TokenizedPair],
) {
    use orpo::train::forward::forward_padded;
    assert!(model.supports_packing());
    let b = refs.len();
    for nll_on_prompt in [true, false] {
        let name = &format!("{name} (nll_on_prompt {nll_on_prompt})");
        let batch = collate(
            refs,
            pad,
            nll_on_prompt,
            model.packed_padding(),
            &Device::Cpu,
        )
        .unwrap();
        let segments = &batch.packed.layout.segments;
        assert!(segments[..b].iter().all(|s| s.prefix.is_none()), "{name}");
        assert!(segments[b..].iter().all(|s| s.prefix.is_some()), "{name}");
        assert!(segments.iter().any(|s| s.pad > 0), "{name}: no padding");
        let a = forward(model, &batch, 0.3).unwrap();
        let p = forward_padded(reference, &batch, 0.3).unwrap();
        assert_close(
            &format!("{name} loss"),
            a.readout.metrics(None).unwrap().loss,
            p.readout.metrics(None).unwrap().loss,
            1e-5,
            1e-9,
        );
        // Absolute 1e-6: differences of log-probs of a few units (log_odds_chosen, margins)
        // near 0 sit at f32 resolution once the plain ops round packed and padded shapes
        // differently (tests/plain_ops.rs); a layout error shows at 1e-3 and up.
        for key in METRIC_NAMES {
            let (x, y) = (
                a.readout.metrics(None).unwrap().get(key).unwrap(),
                p.readout.metrics(None).unwrap().get(key).unwrap(),
            );
            assert_close(&format!("{name} {key}"), x, y, 1e-5, 1e-6);
        }
        let (ga, gp) = (
            model.gradients(&a.objective).unwrap(),
            reference.gradients(&p.objective).unwrap(),
        );
        assert_grads_close(name, (model, &ga), (reference, &gp));
    }
}

/// Every parameter's gradient in `got` within 1e-5 of the largest entry of `want`'s.
fn assert_grads_close(name: &str, got: (&CausalLm, &GradStore), want: (&CausalLm, &GradStore)) {
    for ((pname, var), (_, wvar)) in got.0.params().iter().zip(want.0.params().iter()) {
        let x = got
            .1
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} {pname}: no gradient"));
        let y = want.1.get(wvar.as_tensor()).unwrap();
        let (diff, scale) = (max_diff(x, y), max_abs(y));
        assert!(
            diff <= 1e-5 * scale + 1e-9,
            "{name} {pname}: max grad diff {diff} (scale {scale})"
        );
    }
}

#[test]
fn packed_batches_match_the_padded_computation() {
    for name in MODELS {
        let g = golden(name);
        let model = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        // Gemma 2 (soft-capped logits, eager masking) has no packed path and trains padded.
        let padded_only = name == "tiny-gemma2";
        assert_eq!(model.supports_packing(), !padded_only, "{name}");
        if !model.supports_packing() {
            continue;
        }
        let pairs = golden_pairs(&g, "tokenized");
        // Four pairs of very different lengths: lots of padding in every row but one.
        let refs: Vec<_> = pairs.iter().take(4).collect();
        assert_packed_matches_padded(name, &model, &model, pad_id(&g), &refs);
        // Packed with gradient checkpointing against the plain padded computation.
        let mut ckpt = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        ckpt.enable_recompute();
        let name = format!("{name} (checkpointed)");
        assert_packed_matches_padded(&name, &ckpt, &model, pad_id(&g), &refs);
    }
}

#[test]
fn packed_batches_match_the_padded_computation_under_a_sliding_window() {
    // tiny-mistral with a window shorter than the batch: real tokens and padding positions
    // lose their earliest keys (some padding positions all of them).
    let g = golden("tiny-mistral");
    let pairs = golden_pairs(&g, "tokenized");
    let refs: Vec<_> = pairs.iter().take(4).collect();
    let tmp = tempfile::tempdir().unwrap();
    for window in [3usize, 7] {
        let dir = tmp.path().join(format!("w{window}"));
        edited_copy("tiny-mistral", &dir, "config.json", |c| {
            c["sliding_window"] = window.into()
        });
        let model = CausalLm::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(model.config().sliding_window, Some(window));
        let shortest = refs
            .iter()
            .map(|p| p.chosen_input_ids.len().min(p.rejected_input_ids.len()))
            .min()
            .unwrap();
        assert!(shortest > window, "every sequence must exceed the window");
        let name = format!("tiny-mistral (window {window})");
        assert_packed_matches_padded(&name, &model, &model, pad_id(&g), &refs);
        // Checkpointed: the padding rows stay out of the checkpoints.
        let mut ckpt = CausalLm::load(&dir, &Device::Cpu).unwrap();
        ckpt.enable_recompute();
        let name = format!("{name} (checkpointed)");
        assert_packed_matches_padded(&name, &ckpt, &model, pad_id(&g), &refs);
    }
}

/// Qwen2 with `use_sliding_window`: only the layers from `max_window_layers` on slide (here
/// layer 1 of 2, window 3), packed as padded. (The same config's eval metrics equal
/// transformers' `ORPOTrainer.evaluate()` to 6 digits.)
#[test]
fn packed_batches_match_the_padded_computation_with_per_layer_windows() {
    let g = golden("tiny-qwen2");
    let pairs = golden_pairs(&g, "tokenized");
    let refs: Vec<_> = pairs.iter().take(4).collect();
    let dir = tempfile::tempdir().unwrap();
    edited_copy("tiny-qwen2", dir.path(), "config.json", |c| {
        c["use_sliding_window"] = true.into();
        c["sliding_window"] = 3.into();
        c["max_window_layers"] = 1.into();
        c.as_object_mut().unwrap().remove("layer_types");
    });
    let model = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.config().sliding_layers, Some(vec![false, true]));
    let plain = CausalLm::load(&model_dir("tiny-qwen2"), &Device::Cpu).unwrap();
    let batch = collate(
        &refs,
        pad_id(&g),
        true,
        model.packed_padding(),
        &Device::Cpu,
    )
    .unwrap();
    let (windowed, full) = (
        forward(&model, &batch, 0.1)
            .unwrap()
            .readout
            .metrics(None)
            .unwrap()
            .loss,
        forward(&plain, &batch, 0.1)
            .unwrap()
            .readout
            .metrics(None)
            .unwrap()
            .loss,
    );
    assert!((windowed - full).abs() > 1e-4, "the window changes nothing");
    assert_packed_matches_padded(
        "tiny-qwen2 (layer 1 windowed)",
        &model,
        &model,
        pad_id(&g),
        &refs,
    );
    let mut ckpt = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    ckpt.enable_recompute();
    assert_packed_matches_padded(
        "tiny-qwen2 (layer 1 windowed, checkpointed)",
        &ckpt,
        &model,
        pad_id(&g),
        &refs,
    );
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for name in MODELS {
        let g = golden(name);
        let plain = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        let mut ckpt = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        ckpt.enable_recompute();
        let pairs = golden_pairs(&g, "tokenized");
        let refs: Vec<_> = pairs.iter().take(3).collect();
        let batch = collate(
            &refs,
            pad_id(&g),
            true,
            plain.packed_padding(),
            &Device::Cpu,
        )
        .unwrap();
        let a = forward(&plain, &batch, 0.1).unwrap();
        let b = forward(&ckpt, &batch, 0.1).unwrap();
        assert_eq!(
            a.readout.metrics(None).unwrap().loss,
            b.readout.metrics(None).unwrap().loss,
            "{name}: forward differs"
        );
        let ga = plain.gradients(&a.objective).unwrap();
        let gb = ckpt.gradients(&b.objective).unwrap();
        let name = format!("{name} (checkpointed)");
        assert_grads_close(&name, (&ckpt, &gb), (&plain, &ga));
    }
}

#[test]
fn a_detached_model_gives_the_same_numbers_without_a_graph() {
    for name in MODELS {
        let g = golden(name);
        for recompute in [false, true] {
            let mut model = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
            if recompute {
                model.enable_recompute();
            }
            let pairs = golden_pairs(&g, "tokenized");
            let refs: Vec<_> = pairs.iter().take(3).collect();
            let batch = collate(
                &refs,
                pad_id(&g),
                true,
                model.packed_padding(),
                &Device::Cpu,
            )
            .unwrap();
            let live = forward(&model, &batch, 0.1).unwrap();
            let detached = model.detached();
            assert!(detached.params().is_empty());
            let out = forward(&detached, &batch, 0.1).unwrap();
            assert!(live.objective.track_op(), "{name}");
            assert!(!out.objective.track_op(), "{name}: a graph was recorded");
            assert_eq!(
                live.readout.metrics(None).unwrap().values,
                out.readout.metrics(None).unwrap().values,
                "{name}"
            );
            assert_eq!(
                live.readout.metrics(None).unwrap().loss,
                out.readout.metrics(None).unwrap().loss,
                "{name}"
            );
        }
    }
}

/// `orpo.nll_on_prompt = false` (the paper's NLL on the answer only) has no TRL golden: the
/// NLL is recomputed here from the model's full logits, token by token, both ways. The
/// `true` case, which the goldens hold, checks the recomputation itself.
#[test]
fn the_nll_counts_the_tokens_it_is_told_to() {
    for name in ["tiny-opt", "tiny-qwen2"] {
        let g = golden(name);
        let model = CausalLm::load(&model_dir(name), &Device::Cpu).unwrap();
        let pairs = golden_pairs(&g, "tokenized");
        let refs: Vec<&TokenizedPair> = pairs.iter().take(3).collect();
        // Per chosen sequence: log p of each next token, and whether it is an answer token.
        let mut per_token: Vec<(f64, bool)> = Vec::new();
        for p in &refs {
            let ids = &p.chosen_input_ids;
            let t = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mask = t.ones_like().unwrap();
            let logits = model.logits(&t, &mask).unwrap().squeeze(0).unwrap();
            let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            for (i, row) in logits.iter().enumerate().take(ids.len() - 1) {
                let m = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                let lp = row[ids[i + 1] as usize] as f64 - lse;
                per_token.push((lp, p.chosen_labels[i + 1] != -100));
            }
        }
        let mean_nll = |answer_only: bool| {
            let counted: Vec<f64> = per_token
                .iter()
                .filter(|(_, answer)| *answer || !answer_only)
                .map(|(lp, _)| -lp)
                .collect();
            counted.iter().sum::<f64>() / counted.len() as f64
        };
        assert!((mean_nll(true) - mean_nll(false)).abs() > 1e-4, "{name}");
        for nll_on_prompt in [true, false] {
            let batch = collate(
                &refs,
                pad_id(&g),
                nll_on_prompt,
                model.packed_padding(),
                &Device::Cpu,
            )
            .unwrap();
            let out = forward(&model, &batch, 0.1).unwrap();
            let got = out.readout.metrics(None).unwrap().get("nll_loss").unwrap();
            assert_close(
                &format!("{name} nll_loss (nll_on_prompt {nll_on_prompt})"),
                got,
                mean_nll(!nll_on_prompt),
                1e-5,
                1e-7,
            );
        }
    }
}

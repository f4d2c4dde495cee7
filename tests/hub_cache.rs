//! Hub ids resolve from a populated hf-hub cache with `HF_HUB_OFFLINE=1` (no network), using
//! the cache layout `models--org--name/{refs/main, snapshots/REV/...}` under `$HF_HOME/hub`:
//! a model, a LoRA adapter repository, a base pinned at a revision, and a model's configs
//! without its weights (enough for `orpo data`).

mod common;

use candle_core::Device;
use common::*;
use orpo::model::{resolve_model_dir, CausalLm};

#[test]
fn offline_hub_id_loads_from_cache() {
    let home = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--tiny--opt");
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    for entry in std::fs::read_dir(model_dir("tiny-opt")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snap.join(entry.file_name())).unwrap();
    }
    // This test binary holds only this test, so setting the environment cannot race.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let dir = resolve_model_dir("tiny/opt", None).unwrap();
    assert_eq!(dir, snap);
    let model = CausalLm::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.params().len(), 36);

    let err = resolve_model_dir("tiny/absent", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiny/absent"), "{err}");

    // An adapter repository (adapter_config.json, no config.json) resolves too: evaluated,
    // merged and trained on from its hub id as from its folder.
    let local = fixtures().join("adapters/tiny-opt-orpo3");
    let repo_dir = home.path().join("hub/models--tiny--opt-adapter");
    let snap = repo_dir.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), rev).unwrap();
    for entry in std::fs::read_dir(&local).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snap.join(entry.file_name())).unwrap();
    }
    assert_eq!(resolve_model_dir("tiny/opt-adapter", None).unwrap(), snap);
    let load = |id: &str| {
        orpo::train::load_model(id, None, None, Default::default(), &Device::Cpu).unwrap()
    };
    let ids = candle_core::Tensor::new(&[[5u32, 17, 300, 42]], &Device::Cpu).unwrap();
    let mask = candle_core::Tensor::new(&[[1u32, 1, 1, 1]], &Device::Cpu).unwrap();
    let from_hub = load("tiny/opt-adapter").model.logits(&ids, &mask).unwrap();
    let from_dir = load(&local.to_string_lossy())
        .model
        .logits(&ids, &mask)
        .unwrap();
    assert_eq!(max_diff(&from_hub, &from_dir), 0.0);
    let out = home.path().join("merged");
    let from = std::path::Path::new("tiny/opt-adapter");
    orpo::merge::merge(None, from, &out, false, orpo::config::SaveDtype::F32).unwrap();
    assert!(out.join("model.safetensors").is_file());
    let config = orpo::config::Config::from_toml_str(
        "",
        "test.toml",
        &[
            format!("model.id={}", model_dir("tiny-opt").display()),
            "lora.enabled=true".into(),
            "lora.init_from=tiny/opt-adapter".into(),
            format!(
                "data.train={}",
                common::repo()
                    .join("examples/data/explicit-10.jsonl")
                    .display()
            ),
        ],
    )
    .unwrap();
    let trainer = orpo::train::load_trainer(&config).unwrap();
    assert_eq!(trainer.model.adapter().unwrap().spec.r, 4);

    // A base read at a revision (this cache has `v1` for it and no `main`): a LoRA run records
    // it in adapter_config.json's `revision`, where PEFT reads it, and evaluating or merging
    // the adapter loads the base there.
    let pinned = home.path().join("hub/models--tiny--opt-pinned");
    copy_dir(&model_dir("tiny-opt"), &pinned.join("snapshots").join(rev));
    std::fs::create_dir_all(pinned.join("refs")).unwrap();
    std::fs::write(pinned.join("refs/v1"), rev).unwrap();
    let run = home.path().join("pinned-run");
    let run_set = format!("train.output_dir={}", run.display());
    let out = train_tiny_opt(
        &[
            "model.id=tiny/opt-pinned",
            "model.revision=v1",
            "lora.enabled=true",
            "train.max_steps=1",
            &run_set,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config_path = run.join("adapter_config.json");
    let mut adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(adapter["base_model_name_or_path"], "tiny/opt-pinned");
    assert_eq!(adapter["revision"], "v1");
    let run_id = run.to_string_lossy().to_string();
    let loaded = orpo::train::load_model(&run_id, None, None, Default::default(), &Device::Cpu);
    assert_eq!(loaded.unwrap().dir, pinned.join("snapshots").join(rev));
    let merged = home.path().join("merged-pinned");
    orpo::merge::merge(None, &run, &merged, false, orpo::config::SaveDtype::F32).unwrap();
    assert!(merged.join("model.safetensors").is_file());
    // Without it the base is looked for at `main`, which is not there.
    adapter["revision"] = serde_json::Value::Null;
    std::fs::write(&config_path, adapter.to_string()).unwrap();
    let err = orpo::train::load_model(&run_id, None, None, Default::default(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tiny/opt-pinned"), "{err}");

    // `orpo data` needs a model's config and tokenizer, not its weights: a cache without the
    // shards its index names serves it, where loading the model is refused.
    let bare = home.path().join("hub/models--tiny--opt-bare");
    let snap = bare.join("snapshots").join(rev);
    copy_dir(&model_dir("tiny-opt"), &snap);
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let index =
        r#"{"weight_map": {"decoder.embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#;
    std::fs::write(snap.join("model.safetensors.index.json"), index).unwrap();
    std::fs::create_dir_all(bare.join("refs")).unwrap();
    std::fs::write(bare.join("refs/main"), rev).unwrap();
    let err = resolve_model_dir("tiny/opt-bare", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
    let r = orpo(&[
        "data",
        "--config",
        "configs/tiny-opt.toml",
        "--set",
        "model.id=tiny/opt-bare",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("pairs:          64"));
}

//! Hub ids resolve from a populated hf-hub cache with `HF_HUB_OFFLINE=1` (no network), using
//! the cache layout `models--org--name/{refs/main, snapshots/REV/...}` under `$HF_HOME/hub`.

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
}

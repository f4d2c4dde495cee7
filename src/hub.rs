//! The Hugging Face hub's environment, read as `huggingface_hub` reads it: `HF_HUB_OFFLINE`
//! (cache only) and `HF_TOKEN` (private and gated repos); hf-hub itself honours `HF_HOME`.

/// Whether `HF_HUB_OFFLINE` is set to a true value: `1`, `ON`, `YES` or `TRUE`, in any case.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_true(&v))
}

fn is_true(v: &str) -> bool {
    ["1", "ON", "YES", "TRUE"]
        .iter()
        .any(|t| v.trim().eq_ignore_ascii_case(t))
}

/// A hub client: `HF_TOKEN` when set, else the token hf-hub finds in its cache folder.
pub fn api(progress: bool) -> Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(progress);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    #[test]
    fn true_values_as_huggingface_hub_reads_them() {
        for v in ["1", "ON", "on", "YES", "yes", "TRUE", "True"] {
            assert!(super::is_true(v), "{v}");
        }
        for v in ["0", "", "off", "no", "false", "2"] {
            assert!(!super::is_true(v), "{v}");
        }
    }
}

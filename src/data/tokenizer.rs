//! Loading and saving tokenizers: `tokenizer.json`, or a GPT-2 style `vocab.json` +
//! `merges.txt` pair with its special tokens; special-token ids and the chat template.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, ModelWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::error::DataError;
use super::template::ChatTemplate;

/// A file of a saved tokenizer: its name and contents (`None`: remove the file).
pub type SavedFile = (&'static str, Option<Vec<u8>>);

/// A tokenizer with the special tokens and chat template TRL would use.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: (String, u32),
    pad: (String, u32),
    /// Whether the tokenizer files name a pad token (else `pad` is EOS).
    pad_named: bool,
    unk: Option<String>,
    template: Option<ChatTemplate>,
    /// The special-token variables a template is rendered with (bos_token, eos_token, ...).
    template_vars: Vec<(String, String)>,
    /// `tokenizer_config.json` as read (empty when absent).
    config: Map<String, Value>,
}

const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// Model types whose tokenizer transformers 5 builds with its `Qwen2Tokenizer` class, which
/// replaces the pre-tokenizer of `tokenizer.json` by its own (digits split one by one).
const QWEN2_TOKENIZER_MODEL_TYPES: [&str; 13] = [
    "qwen2",
    "qwen2_moe",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen2_audio",
    "qwen2_5_omni",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_omni_moe",
    "ovis2",
];

/// Whether transformers 5.24's `AutoTokenizer` loads this folder as `Qwen2Tokenizer`: for the
/// model types above when the tokenizer's declared class (tokenizer_config.json, else
/// config.json) is that class or absent; for another declared class only for `qwen2`, which
/// transformers lists among the models whose hub class it overrides
/// (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`). Otherwise the declared generic class keeps
/// `tokenizer.json` as it is.
fn uses_qwen2_tokenizer(model_type: &str, declared_class: Option<&str>) -> bool {
    if !QWEN2_TOKENIZER_MODEL_TYPES.contains(&model_type) {
        return false;
    }
    match declared_class.map(|c| c.trim_end_matches("Fast")) {
        None | Some("Qwen2Tokenizer") => true,
        Some(_) => model_type == "qwen2",
    }
}

/// `Qwen2Tokenizer`'s pre-tokenization pattern (transformers).
const QWEN2_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Gives a byte-level BPE the pipeline of transformers' `Qwen2Tokenizer`: NFC normalizer,
/// split by its pattern, then byte level without a regex.
fn apply_qwen2_pipeline(tok: &mut tokenizers::Tokenizer) -> Result<(), String> {
    if !matches!(tok.get_model(), ModelWrapper::BPE(_)) {
        return Ok(());
    }
    let split = Split::new(
        SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    let seq = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    tok.with_normalizer(Some(NFC));
    tok.with_pre_tokenizer(Some(seq));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(())
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>, DataError> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| DataError::Tokenizer {
            dir: dir.to_path_buf(),
            msg: format!("{name}: invalid JSON: {e}"),
        })
}

/// A special-token entry: a string, or an AddedToken-like object with `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn added_token(v: &Value, special: bool) -> Option<AddedToken> {
    let content = token_content(v)?;
    let flag = |k: &str| v.get(k).and_then(Value::as_bool);
    let special = flag("special").unwrap_or(special);
    Some(
        AddedToken::from(content, special)
            .single_word(flag("single_word").unwrap_or(false))
            .lstrip(flag("lstrip").unwrap_or(false))
            .rstrip(flag("rstrip").unwrap_or(false))
            .normalized(flag("normalized").unwrap_or(!special)),
    )
}

fn config_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Value::Array(items) => config_id(items.first()),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let err = |msg: String| DataError::Tokenizer {
            dir: dir.to_path_buf(),
            msg,
        };
        if !dir.is_dir() {
            return Err(err("not a directory".into()));
        }
        let config_value = read_json(dir, "tokenizer_config.json")?;
        let special_map = read_json(dir, "special_tokens_map.json")?;
        let config = match &config_value {
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(err("tokenizer_config.json: expected a JSON object".into())),
            None => Map::new(),
        };
        let smap = match &special_map {
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(err("special_tokens_map.json: expected a JSON object".into())),
            None => Map::new(),
        };
        // Special token strings: tokenizer_config.json first, then special_tokens_map.json.
        let named = |key: &str| -> Option<String> {
            config
                .get(key)
                .and_then(token_content)
                .or_else(|| smap.get(key).and_then(token_content))
        };

        let mut inner = if dir.join("tokenizer.json").is_file() {
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                .map_err(|e| err(format!("tokenizer.json: {e}")))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            Self::build_bpe(dir, &config, &smap, &named)?
        } else {
            return Err(err(
                "found neither tokenizer.json nor vocab.json + merges.txt".into(),
            ));
        };
        let model_config = read_json(dir, "config.json")?;
        let model_type = model_config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let declared_class = config
            .get("tokenizer_class")
            .or_else(|| model_config.as_ref().and_then(|c| c.get("tokenizer_class")))
            .and_then(Value::as_str);
        if uses_qwen2_tokenizer(model_type, declared_class) {
            apply_qwen2_pipeline(&mut inner)
                .map_err(|e| err(format!("Qwen2 pre-tokenizer: {e}")))?;
        }
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| err(format!("cannot disable truncation: {e}")))?;

        let lookup = |key: &str| -> Result<Option<(String, u32)>, DataError> {
            match named(key) {
                None => Ok(None),
                Some(s) => match inner.token_to_id(&s) {
                    Some(id) => Ok(Some((s, id))),
                    None => Err(err(format!("{key} {s:?} is not in the vocabulary"))),
                },
            }
        };
        let mut bos = lookup("bos_token")?;
        let mut eos = lookup("eos_token")?;
        let pad = lookup("pad_token")?;
        let unk = named("unk_token");

        // Only when the tokenizer files say nothing about special tokens, fall back to the
        // model's config.json (TRL uses the tokenizer's tokens).
        let tokenizer_files_name_tokens = config_value.is_some() || special_map.is_some();
        if !tokenizer_files_name_tokens || eos.is_none() {
            if let Some(model_config) = &model_config {
                let by_id = |k: &str| {
                    config_id(model_config.get(k))
                        .and_then(|id| inner.id_to_token(id).map(|s| (s, id)))
                };
                if !tokenizer_files_name_tokens && bos.is_none() {
                    bos = by_id("bos_token_id");
                }
                if eos.is_none() {
                    eos = by_id("eos_token_id");
                }
            }
        }
        let eos = eos.ok_or_else(|| {
            err("no EOS token: tokenizer_config.json, special_tokens_map.json and config.json name none".into())
        })?;
        let pad_named = pad.is_some();
        let pad = pad.unwrap_or_else(|| eos.clone());

        let template_src = if dir.join("chat_template.jinja").is_file() {
            let path = dir.join("chat_template.jinja");
            Some(std::fs::read_to_string(&path).map_err(|source| DataError::Io { path, source })?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let mut special = Vec::new();
        for key in SPECIAL_KEYS {
            if let Some(s) = named(key) {
                special.push((key.to_string(), s));
            }
        }
        // TRL setups set pad = EOS when the tokenizer has none; templates see that too.
        if named("pad_token").is_none() {
            special.push(("pad_token".to_string(), pad.0.clone()));
        }
        let template = match template_src {
            Some(src) => Some(
                ChatTemplate::new(&src, special.clone())
                    .map_err(|e| DataError::TemplateSyntax(format!("{}: {e}", dir.display())))?,
            ),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            pad,
            unk,
            pad_named,
            template,
            template_vars: special,
            config,
        })
    }

    /// A byte-level BPE from GPT-2 style `vocab.json` + `merges.txt`, as transformers'
    /// GPT2 converter builds it.
    fn build_bpe(
        dir: &Path,
        config: &Map<String, Value>,
        smap: &Map<String, Value>,
        named: &dyn Fn(&str) -> Option<String>,
    ) -> Result<tokenizers::Tokenizer, DataError> {
        let err = |msg: String| DataError::Tokenizer {
            dir: dir.to_path_buf(),
            msg,
        };
        let path_str = |p: PathBuf| p.to_string_lossy().into_owned();
        let bpe = BPE::from_file(
            &path_str(dir.join("vocab.json")),
            &path_str(dir.join("merges.txt")),
        )
        .build()
        .map_err(|e| err(format!("vocab.json / merges.txt: {e}")))?;
        let add_prefix_space = config
            .get("add_prefix_space")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));

        // Added tokens: tokenizer_config's added_tokens_decoder (by id), then every special
        // token named by the tokenizer files.
        let mut added: Vec<(u64, AddedToken)> = Vec::new();
        if let Some(Value::Object(dec)) = config.get("added_tokens_decoder") {
            for (id, v) in dec {
                if let (Ok(id), Some(t)) = (id.parse::<u64>(), added_token(v, true)) {
                    added.push((id, t));
                }
            }
        }
        added.sort_by_key(|(id, _)| *id);
        let mut tokens: Vec<AddedToken> = added.into_iter().map(|(_, t)| t).collect();
        for key in SPECIAL_KEYS {
            for source in [config, smap] {
                if let Some(t) = source.get(key).and_then(|v| added_token(v, true)) {
                    tokens.push(t.special(true));
                }
            }
        }
        for source in [config, smap] {
            if let Some(Value::Array(items)) = source.get("additional_special_tokens") {
                tokens.extend(items.iter().filter_map(|v| added_token(v, true)));
            }
        }
        let mut seen = std::collections::HashSet::new();
        tokens.retain(|t| seen.insert(t.content.clone()));
        tok.add_special_tokens(&tokens);

        // The slow tokenizer's add_bos_token becomes a post-processor, as in tokenizer.json.
        let add_bos = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(bos) = named("bos_token").filter(|_| add_bos) {
            if let Some(id) = tok.token_to_id(&bos) {
                let processor = TemplateProcessing::builder()
                    .try_single(format!("{bos} $A"))
                    .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                    .map_err(|e| err(format!("BOS post-processor: {e}")))?
                    .special_tokens(vec![(bos.clone(), id)])
                    .build()
                    .map_err(|e| err(format!("BOS post-processor: {e}")))?;
                tok.with_post_processor(Some(processor));
            }
        }
        Ok(tok)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// BOS id, if the tokenizer has a BOS token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    pub fn eos_id(&self) -> u32 {
        self.eos.1
    }

    /// Pad id: the pad token if any, else EOS.
    pub fn pad_id(&self) -> u32 {
        self.pad.1
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.0.as_str())
    }

    pub fn eos_token(&self) -> &str {
        &self.eos.0
    }

    pub fn pad_token(&self) -> &str {
        &self.pad.0
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.unk.as_deref()
    }

    /// Replaces the model's chat template, or gives one to a model without (`data.chat_template`,
    /// the `chat_template` of TRL recipes); `origin` names it in errors.
    pub fn set_chat_template(&mut self, source: &str, origin: &str) -> Result<(), DataError> {
        let template = ChatTemplate::new(source, self.template_vars.clone())
            .map_err(|e| DataError::TemplateSyntax(format!("{origin}: {e}")))?;
        self.template = Some(template);
        Ok(())
    }

    /// Source of the chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source())
    }

    pub(crate) fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Encodes without special tokens (as TRL's `tokenize_row` does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and (when there is
    /// a template) chat_template.jinja, so that transformers' AutoTokenizer loads `out`, old
    /// versions included.
    pub fn save_to(&self, out: &Path) -> Result<(), DataError> {
        let io = |path: PathBuf| move |source| DataError::Io { path, source };
        std::fs::create_dir_all(out).map_err(io(out.to_path_buf()))?;
        for (name, bytes) in self.saved_files(out)? {
            let path = out.join(name);
            match bytes {
                Some(b) => std::fs::write(&path, b).map_err(io(path))?,
                None if path.exists() => std::fs::remove_file(&path).map_err(io(path))?,
                None => {}
            }
        }
        Ok(())
    }

    /// The files `save_to` writes, by name, with their contents (`None`: a file to remove, the
    /// chat template of a tokenizer without one), for a caller that writes them atomically.
    /// `out` only names the folder in errors.
    pub fn saved_files(&self, out: &Path) -> Result<Vec<SavedFile>, DataError> {
        let tokenizer_json = self
            .inner
            .to_string(false)
            .map_err(|e| DataError::Tokenizer {
                dir: out.to_path_buf(),
                msg: format!("cannot write tokenizer.json: {e}"),
            })?;

        let mut specials = Map::new();
        if let Some(b) = self.bos_token() {
            specials.insert("bos_token".into(), b.into());
        }
        specials.insert("eos_token".into(), self.eos_token().into());
        if let Some(u) = self.unk_token() {
            specials.insert("unk_token".into(), u.into());
        }
        // A pad token the source did not name (EOS stands in for it) is not written back, so
        // the saved tokenizer is the one trained from.
        if self.pad_named {
            specials.insert("pad_token".into(), self.pad_token().into());
        }

        let mut config = self.config.clone();
        // The template trained with, in chat_template.jinja (where transformers 4.47 and later
        // look first) and in tokenizer_config.json (the only place before 4.47).
        match self.chat_template() {
            Some(t) => config.insert("chat_template".into(), Value::String(t.to_string())),
            None => config.remove("chat_template"),
        };
        for key in SPECIAL_KEYS {
            if let Some(v) = config.get(key).and_then(token_content) {
                config.insert(key.to_string(), Value::String(v));
            }
        }
        for (k, v) in &specials {
            config.insert(k.clone(), v.clone());
        }
        // transformers 5 lists added special tokens as `extra_special_tokens`, a name 4.47-4.55
        // read as a dict (crashing on a list); `additional_special_tokens` is 4.x's name for
        // the list, which transformers 5 still reads as `extra_special_tokens`.
        if matches!(config.get("extra_special_tokens"), Some(Value::Array(_)))
            && !config.contains_key("additional_special_tokens")
        {
            if let Some(list) = config.remove("extra_special_tokens") {
                config.insert("additional_special_tokens".into(), list);
            }
        }
        // transformers 5 names its fast tokenizer `TokenizersBackend`, a class 4.x lacks;
        // `PreTrainedTokenizerFast` is the same class in 5 and loads in 4.x too.
        let class = config.get("tokenizer_class").and_then(Value::as_str);
        if matches!(class, None | Some("TokenizersBackend")) {
            config.insert(
                "tokenizer_class".into(),
                Value::String("PreTrainedTokenizerFast".into()),
            );
        }
        let json = |v: Value| {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            Some((text + "\n").into_bytes())
        };
        Ok(vec![
            ("tokenizer.json", Some(tokenizer_json.into_bytes())),
            ("tokenizer_config.json", json(Value::Object(config))),
            ("special_tokens_map.json", json(Value::Object(specials))),
            (
                "chat_template.jinja",
                self.chat_template().map(|t| t.as_bytes().to_vec()),
            ),
        ])
    }
}

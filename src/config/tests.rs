//! Loading, overrides, errors and round trips of whole configurations.

use super::*;

const MINIMAL: &str = "[model]\nid = \"m\"\n";

fn load(text: &str, sets: &[&str]) -> Result<Config, ConfigError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_toml_str(text, "c.toml", &sets)
}

fn err(text: &str, sets: &[&str]) -> String {
    match load(text, sets) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c, Config::with_model("m"));
    assert_eq!(c.model.device, "cpu");
    assert_eq!(c.model.dtype, Dtype::F32);
    assert_eq!(c.model.revision, None);
    assert_eq!(c.data.train, None);
    assert_eq!(c.data.max_length, 1024);
    assert_eq!(c.data.max_prompt_length, 512);
    assert_eq!(c.orpo.beta, 0.1);
    assert!(c.orpo.nll_on_prompt);
    assert_eq!(c.optim.lr, 8e-6);
    assert_eq!(c.optim.scheduler, Scheduler::Linear);
    assert_eq!(c.optim.warmup_steps, 0);
    assert_eq!(c.optim.weight_decay, 0.0);
    assert_eq!(c.optim.max_grad_norm, 1.0);
    assert_eq!(
        (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    let t = &c.train;
    assert_eq!(
        (t.batch_size, t.grad_accum, t.epochs, t.max_steps),
        (8, 1, 1.0, 0)
    );
    assert!(t.shuffle);
    assert_eq!(
        (t.seed, t.log_every, t.save_every),
        (42, Interval::Steps(10), Interval::Never)
    );
    assert_eq!(t.save_total_limit, None);
    assert_eq!(t.output_dir, "runs/example");
    assert!(!t.gradient_checkpointing);
    let l = &c.lora;
    assert!(!l.enabled);
    assert_eq!((l.r, l.alpha, l.dropout), (16, 32.0, 0.0));
    assert_eq!(l.targets, LoraTargets::AllLinear);
    assert!(!l.use_rslora);
    assert!(matches!(
        c.validate_for_train(),
        Err(ConfigError::MissingTrainData)
    ));
}

#[test]
fn spec_example_parses() {
    let text = r#"
[model]
id = "../shared/fixtures/tiny-opt"
revision = "main"
device = "cpu"
dtype = "f32"

[data]
train = "pairs.jsonl"
eval = "heldout.jsonl"
max_length = 1024
max_prompt_length = 512

[orpo]
beta = 0.1

[optim]
lr = 8e-6
scheduler = "linear"
warmup_steps = 0
weight_decay = 0.0
max_grad_norm = 1.0

[train]
batch_size = 8
grad_accum = 1
epochs = 1
max_steps = 0
shuffle = true
seed = 42
log_every = 10
save_every = 0
output_dir = "runs/example"
gradient_checkpointing = false

[lora]
enabled = true
r = 16
alpha = 32
dropout = 0.0
targets = "all-linear"
"#;
    let c = load(text, &[]).unwrap();
    assert_eq!(c.model.revision.as_deref(), Some("main"));
    assert_eq!(c.data.train, Some(DataFiles::from("pairs.jsonl")));
    assert!(c.lora.enabled);
    assert_eq!(c.lora.alpha, 32.0);
    c.validate_for_train().unwrap();
}

#[test]
fn integers_accepted_as_floats() {
    let c = load(
        "[model]\nid='m'\n[optim]\nlr = 1\nmax_grad_norm = 0\n[orpo]\nbeta = 2",
        &[],
    )
    .unwrap();
    assert_eq!(c.optim.lr, 1.0);
    assert_eq!(c.optim.max_grad_norm, 0.0);
    assert_eq!(c.orpo.beta, 2.0);
    let c = load(MINIMAL, &["optim.lr=2"]).unwrap();
    assert_eq!(c.optim.lr, 2.0);
}

#[test]
fn overrides() {
    let c = load(
        MINIMAL,
        &[
            "train.max_steps=20",
            "optim.lr=1e-5",
            "train.shuffle=false",
            "model.dtype=bf16",
            "optim.scheduler=cosine",
            "data.train=pairs.jsonl",
            "model.id=org/name",
            "model.revision=2024",
            "lora.targets=[\"q_proj\", \"v_proj\"]",
            "train.save_total_limit=3",
            " optim.warmup_steps = 5 ",
        ],
    )
    .unwrap();
    assert_eq!(c.train.max_steps, 20);
    assert_eq!(c.optim.lr, 1e-5);
    assert!(!c.train.shuffle);
    assert_eq!(c.model.dtype, Dtype::Bf16);
    assert_eq!(c.optim.scheduler, Scheduler::Cosine);
    assert_eq!(c.data.train, Some(DataFiles::from("pairs.jsonl")));
    assert_eq!(c.model.id, "org/name");
    assert_eq!(c.model.revision.as_deref(), Some("2024"));
    assert_eq!(
        c.lora.targets,
        LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(c.train.save_total_limit, Some(3));
    assert_eq!(c.optim.warmup_steps, 5);

    let c = load(MINIMAL, &["lora.targets=q_proj,v_proj"]).unwrap();
    assert_eq!(
        c.lora.targets,
        LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
    );
    let c = load(
        MINIMAL,
        &["lora.targets=all-linear", "model.dtype=bfloat16"],
    )
    .unwrap();
    assert_eq!(c.lora.targets, LoraTargets::AllLinear);
    assert_eq!(c.model.dtype, Dtype::Bf16);
    // Override wins over the file; a missing model.id can come from --set.
    let c = load("[optim]\nlr = 1e-3\n", &["optim.lr=5e-4", "model.id=x"]).unwrap();
    assert_eq!(c.optim.lr, 5e-4);
    assert_eq!(c.model.id, "x");
    // Value containing '=' keeps everything after the first '='.
    let c = load(MINIMAL, &["train.output_dir=runs/a=b"]).unwrap();
    assert_eq!(c.train.output_dir, "runs/a=b");
}

#[test]
fn malformed_overrides() {
    let e = err(MINIMAL, &["optim.lr"]);
    assert!(
        e.contains("c.toml") && e.contains("optim.lr") && e.contains('='),
        "{e}"
    );
    let e = err(MINIMAL, &["lr=1"]);
    assert!(e.contains("lr=1") && e.contains("section"), "{e}");
    let e = err(MINIMAL, &["a.b.c=1"]);
    assert!(e.contains("a.b.c=1"), "{e}");
    let e = err(MINIMAL, &[".lr=1"]);
    assert!(e.contains(".lr=1"), "{e}");
    let e = err(MINIMAL, &["optim.lrr=1"]);
    assert!(
        e.contains("(--set)") && e.contains("did you mean `optim.lr`?"),
        "{e}"
    );
    let e = err(MINIMAL, &["optimm.lr=1"]);
    assert!(e.contains("did you mean `[optim]`?"), "{e}");
    let e = err(MINIMAL, &["optim.lr=abc"]);
    assert!(
        e.contains("c.toml (--set): optim.lr: expected a float, found string \"abc\""),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_sections() {
    let e = err("[model]\nid='m'\n[optim]\nlrr = 1e-5\n", &[]);
    assert!(
        e.contains("c.toml") && e.contains("optim.lrr") && e.contains("did you mean `optim.lr`?"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[train]\nlr = 1e-5\n", &[]);
    assert!(e.contains("train.lr") && e.contains("`optim.lr`"), "{e}");
    let e = err("[model]\nid='m'\n[train]\nbatchsize = 4\n", &[]);
    assert!(e.contains("did you mean `train.batch_size`?"), "{e}");
    let e = err("[model]\nid='m'\n[trian]\nseed = 1\n", &[]);
    assert!(
        e.contains("[trian]") && e.contains("did you mean `[train]`?"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[zzzzzzzz]\n", &[]);
    assert!(e.contains("valid sections"), "{e}");
    let e = err("lr = 1\n[model]\nid='m'\n", &[]);
    assert!(
        e.contains("`lr`") && e.contains("top level") && e.contains("optim.lr"),
        "{e}"
    );
    let e = err("model = 1\n", &[]);
    assert!(e.contains("model") && e.contains("expected a table"), "{e}");
    let e = err("[model]\nid='m'\nqqqqqqqqqqqq = 1\n", &[]);
    assert!(e.contains("unknown key `model.qqqqqqqqqqqq`"), "{e}");
}

#[test]
fn wrong_types() {
    let e = err("[model]\nid='m'\n[optim]\nlr = \"fast\"\n", &[]);
    assert_eq!(
        e,
        "c.toml: optim.lr: expected a float, found string \"fast\""
    );
    let e = err("[model]\nid='m'\n[train]\nbatch_size = 2.5\n", &[]);
    assert!(
        e.contains("train.batch_size: expected an integer, found float 2.5"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[optim]\nwarmup_steps = 0.1\n", &[]);
    assert!(e.contains("optim.warmup_ratio = 0.1"), "{e}");
    let e = err("[model]\nid='m'\n[train]\nbatch_size = -1\n", &[]);
    assert!(
        e.contains("train.batch_size: expected a non-negative integer"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[train]\nshuffle = 1\n", &[]);
    assert!(e.contains("train.shuffle: expected a boolean"), "{e}");
    let e = err("[model]\nid=3\n", &[]);
    assert!(
        e.contains("model.id: expected a string, found integer 3"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[lora]\ntargets = [1]\n", &[]);
    assert!(e.contains("lora.targets"), "{e}");
    let e = err("[model]\nid='m'\n[lora]\ntargets = '(q_proj'\n", &[]);
    assert!(
        e.contains("lora.targets") && e.contains("not a valid regular expression"),
        "{e}"
    );
    let e = err("[model]\nid='m'\n[lora]\ntargets = []\n", &[]);
    assert!(e.contains("lora.targets") && e.contains("empty"), "{e}");
}

#[test]
fn unknown_enums() {
    let e = err("[model]\nid='m'\n[optim]\nscheduler = 'cosin'\n", &[]);
    assert!(
        e.contains("optim.scheduler")
            && e.contains("constant_with_warmup")
            && e.contains("inverse_sqrt"),
        "{e}"
    );
    let e = err("[model]\nid='m'\ndtype = 'f16'\n", &[]);
    assert!(
        e.contains("model.dtype") && e.contains("bfloat16") && e.contains("f32"),
        "{e}"
    );
    let e = err("[model]\nid='m'\ndevice = 'gpu'\n", &[]);
    assert!(e.contains("model.device") && e.contains("cuda:N"), "{e}");
    for d in ["cpu", "cuda", "cuda:1", "auto"] {
        load(&format!("[model]\nid='m'\ndevice = '{d}'\n"), &[]).unwrap();
    }
    for (s, k) in Scheduler::NAMES.iter().zip(Scheduler::ALL) {
        let set = format!("optim.scheduler={s}");
        // cosine_with_min_lr has no default floor (transformers raises without one).
        let floor = "optim.min_lr_rate=0";
        let sets: &[&str] = if k == Scheduler::CosineWithMinLr {
            &[&set, floor]
        } else {
            &[&set]
        };
        let c = load(MINIMAL, sets).unwrap();
        assert_eq!(c.optim.scheduler, k);
    }
    let c = load("[model]\nid='m'\ndtype='float32'", &[]).unwrap();
    assert_eq!(c.model.dtype, Dtype::F32);
}

#[test]
fn ranges() {
    let cases: &[(&str, &str)] = &[
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-5", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("orpo.beta=-0.1", "orpo.beta"),
        ("data.max_length=0", "data.max_length"),
        ("data.max_prompt_length=2000", "data.max_prompt_length"),
        ("optim.weight_decay=-0.01", "optim.weight_decay"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("lora.r=0", "lora.r"),
        ("optim.adam_beta2=1.0", "optim.adam_beta2"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("train.log_every=0", "train.log_every"),
        ("train.save_total_limit=0", "train.save_total_limit"),
    ];
    for (set, key) in cases {
        let e = load(MINIMAL, &[set]).unwrap_err();
        assert_eq!(e.key(), Some(*key), "{set}: {e}");
        let s = e.to_string();
        assert!(s.starts_with("c.toml"), "{s}");
    }
    let e = load("[model]\nid='m'\n[train]\nepochs = 0\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("train.epochs"));
    assert!(e.to_string().starts_with("c.toml: train.epochs"), "{e}");
    // epochs 0 is fine with max_steps
    load("[model]\nid='m'\n[train]\nepochs = 0\nmax_steps = 3\n", &[]).unwrap();
    // max_grad_norm 0 disables clipping; max_prompt_length == max_length is allowed
    load(
        MINIMAL,
        &["optim.max_grad_norm=0", "data.max_prompt_length=1024"],
    )
    .unwrap();
}

#[test]
fn missing_and_parse_errors() {
    let e = err("", &[]);
    assert_eq!(e, "c.toml: missing required key `model.id`");
    let e = err("[model]\nid = ''\n", &[]);
    assert!(e.contains("model.id"), "{e}");
    let e = err("[model\nid = 'm'", &[]);
    assert!(e.starts_with("c.toml: invalid TOML"), "{e}");
    let e = err("[model]\nid='m'\n[data]\ntrain = ''\n", &[]);
    assert!(e.contains("data.train"), "{e}");
    let e = Config::load(Path::new("/nonexistent/x.toml"), &[]).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");
}

#[test]
fn round_trip() {
    let mut c = Config::with_model("org/name");
    c.model.revision = Some("main".into());
    c.model.dtype = Dtype::Bf16;
    c.data.train = Some("a.jsonl".into());
    c.optim.lr = 1.2345678901234567e-5;
    c.optim.scheduler = Scheduler::InverseSqrt;
    c.train.save_total_limit = Some(2);
    c.lora.targets = LoraTargets::Modules(vec!["q_proj".into()]);
    c.lora.alpha = 16.0;
    for cfg in [c, Config::with_model("m")] {
        let text = cfg.to_toml_string();
        let back = Config::from_toml_str(&text, "saved.toml", &[]).unwrap();
        assert_eq!(back, cfg, "{text}");
    }
    let c = Config::with_model("m")
        .with_overrides("<cli>", &["train.batch_size=2".into()])
        .unwrap();
    assert_eq!(c.train.batch_size, 2);
    Config::with_model("m").validate("x").unwrap();
}

#[test]
fn data_source_keys() {
    let base = "[model]\nid = \"m\"\n[data]\ntrain = \"org/name\"\neval = \"org/name\"\n";
    let c = load(base, &[]).unwrap();
    let t = c.data.source(false).unwrap();
    assert_eq!(
        (t.split.as_str(), t.subset, t.revision),
        ("train", None, None)
    );
    assert!(t.columns.is_default());
    assert_eq!(c.data.source(true).unwrap().split, "test");
    let c = load(
        &format!(
            "{base}subset = \"harmless-base\"\nrevision = \"v1\"\nprompt_column = \"question\"\n"
        ),
        &[
            "data.chosen_column=response_j",
            "data.rejected_column=response_k",
            "data.eval_split=validation",
        ],
    )
    .unwrap();
    let e = c.data.source(true).unwrap();
    assert_eq!(e.split, "validation");
    assert_eq!(e.subset.as_deref(), Some("harmless-base"));
    assert_eq!(e.revision.as_deref(), Some("v1"));
    assert_eq!(
        (
            e.columns.prompt.as_str(),
            e.columns.chosen.as_str(),
            e.columns.rejected.as_str()
        ),
        ("question", "response_j", "response_k")
    );
    assert!(Config::with_model("m").data.source(false).is_none());
    let e = err(base, &["data.chosen_column=prompt"]);
    assert!(
        e.contains("data.chosen_column") && e.contains("already used by data.prompt_column"),
        "{e}"
    );
    let e = err(base, &["data.train_split="]);
    assert!(e.contains("data.train_split: must not be empty"), "{e}");
    let e = err(&format!("{base}subset = 3\n"), &[]);
    assert!(e.contains("data.subset: expected a string"), "{e}");
    let e = err(&format!("{base}chosen_col = \"a\"\n"), &[]);
    assert!(e.contains("did you mean `data.chosen_column`"), "{e}");
    let e = err(&format!("{base}split = \"a\"\n"), &[]);
    assert!(e.contains("unknown key `data.split`"), "{e}");
}

#[test]
fn data_locations_may_be_lists() {
    let c = load(MINIMAL, &["data.train=[\"a.jsonl\", \"shards/*.parquet\"]"]).unwrap();
    let t = c.data.source(false).unwrap();
    assert_eq!(
        (t.location.as_str(), t.more.as_slice()),
        ("a.jsonl", &["shards/*.parquet".to_string()][..])
    );
    // A comma in a plain path is part of the name, not a separator.
    let c = load(MINIMAL, &["data.eval=held,out.jsonl"]).unwrap();
    assert_eq!(c.data.eval, Some(DataFiles::from("held,out.jsonl")));
    let c = load(
        &format!("{MINIMAL}[data]\ntrain = [\"a.jsonl\", \"b.jsonl\"]\n"),
        &[],
    )
    .unwrap();
    let back = Config::from_toml_str(&c.to_toml_string(), "saved.toml", &[]).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.data.train.unwrap().0, ["a.jsonl", "b.jsonl"]);
    let e = err(&format!("{MINIMAL}[data]\ntrain = []\n"), &[]);
    assert!(
        e.contains("data.train: the list of locations is empty"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}[data]\ntrain = [\"a.jsonl\", 3]\n"), &[]);
    assert!(e.contains("data.train: expected a list of strings"), "{e}");
    let e = err(
        &format!("{MINIMAL}[data]\ntrain = [\"a.jsonl\", \" \"]\n"),
        &[],
    );
    assert!(e.contains("data.train: must not be empty"), "{e}");
}

#[test]
fn schedule_arguments_belong_to_their_schedules() {
    let ok = load(
        MINIMAL,
        &[
            "optim.scheduler=cosine_with_min_lr",
            "optim.min_lr_rate=0.1",
        ],
    )
    .unwrap();
    assert_eq!(ok.optim.min_lr_rate, Some(0.1));
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["optim.min_lr_rate=0.1"],
            "optim.min_lr_rate",
            "read only by optim.scheduler = cosine_with_min_lr",
        ),
        (&["optim.power=2"], "optim.power", "polynomial"),
        (
            &["optim.scheduler=cosine", "optim.num_cycles=0"],
            "optim.num_cycles",
            "> 0",
        ),
        (
            &["optim.scheduler=cosine_with_min_lr"],
            "optim.scheduler",
            "optim.min_lr_rate",
        ),
        (
            &[
                "optim.scheduler=cosine_with_min_lr",
                "optim.min_lr_rate=0.1",
                "optim.min_lr=1e-7",
            ],
            "optim.min_lr",
            "use one of them",
        ),
        (
            &[
                "optim.scheduler=cosine_with_min_lr",
                "optim.min_lr_rate=1.5",
            ],
            "optim.min_lr_rate",
            "[0, 1]",
        ),
        (
            &[
                "optim.scheduler=polynomial",
                "optim.lr=1e-5",
                "optim.lr_end=1e-4",
            ],
            "optim.lr_end",
            "smaller",
        ),
        (
            &["optim.scheduler=polynomial", "optim.lr=1e-8"],
            "optim.lr",
            "when unset",
        ),
        (
            &["optim.scheduler=linear_with_restarts"],
            "optim.scheduler",
            "cosine_with_restarts",
        ),
    ];
    for (sets, key, msg) in cases {
        let e = load(MINIMAL, sets).unwrap_err();
        assert_eq!(e.key(), Some(*key), "{sets:?}: {e}");
        assert!(e.to_string().contains(msg), "{sets:?}: {e}");
    }
}

#[test]
fn report_to_takes_tensorboard_or_none() {
    for sets in [
        &["train.report_to=tensorboard"][..],
        &["train.report_to=none"][..],
        &["train.report_to=[\"tensorboard\", \"none\"]"][..],
    ] {
        load(MINIMAL, sets).unwrap();
    }
    assert!(load(MINIMAL, &["train.report_to=tensorboard"])
        .unwrap()
        .train
        .tensorboard());
    assert!(!load(MINIMAL, &[]).unwrap().train.tensorboard());
    let e = load(MINIMAL, &["train.report_to=wandb"]).unwrap_err();
    assert_eq!(e.key(), Some("train.report_to"));
    assert!(e.to_string().contains("valid: tensorboard, none"), "{e}");
    let e = load(MINIMAL, &["train.report_to=[1]"]).unwrap_err();
    assert_eq!(e.key(), Some("train.report_to"), "{e}");
}

#[test]
fn eval_size_is_a_fraction_or_a_count_without_eval_data() {
    for v in ["0.01", "0.5", "3", "200"] {
        let c = load(MINIMAL, &[&format!("data.eval_size={v}")]).unwrap();
        assert!(c.data.eval_size.is_some());
    }
    for v in ["0", "-1", "1.5", "nan", "1.0", "3.0"] {
        let e = load(MINIMAL, &[&format!("data.eval_size={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("data.eval_size"), "{v}: {e}");
    }
    // A float of 1 or more is no count (datasets refuses it); the message says how to write one.
    let e = load(MINIMAL, &["data.eval_size=3.0"]).unwrap_err();
    assert!(e.to_string().contains("write an integer (3)"), "{e}");
    // A count is saved as a count: the run's orpo.toml reads back.
    let c = load(MINIMAL, &["data.eval_size=3"]).unwrap();
    let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
    assert_eq!(back, c);
    let e = load(MINIMAL, &["data.eval=held.jsonl", "data.eval_size=0.1"]).unwrap_err();
    assert!(e.to_string().contains("not both"), "{e}");
    // Held-out pairs count as evaluation data for eval_every.
    let mut c = load(MINIMAL, &["data.eval_size=0.1", "train.eval_every=5"]).unwrap();
    c.data.train = Some("pairs.jsonl".into());
    c.validate_for_train().unwrap();
}

#[test]
fn save_and_eval_every_take_steps_or_epoch() {
    let c = load(
        "[model]\nid = \"m\"\n[train]\nsave_every = \"epoch\"\neval_every = 4\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.train.save_every, Interval::Epoch);
    assert_eq!(c.train.eval_every, Interval::Steps(4));
    let c = load(MINIMAL, &["train.eval_every=epoch", "train.save_every=0"]).unwrap();
    assert_eq!(c.train.eval_every, Interval::Epoch);
    assert_eq!(c.train.save_every, Interval::Never);
    // Saved next to checkpoints and read back equal.
    let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
    assert_eq!(back, c);
    for (v, hint) in [
        ("steps", "eval_steps"),
        ("no", "0 here"),
        ("epochs", "singular"),
        ("-1", "non-negative"),
        ("1.5", "a fraction below 1"),
        ("-0.5", "a fraction below 1"),
    ] {
        let e = load(MINIMAL, &[&format!("train.eval_every={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("train.eval_every"), "{v}: {e}");
        assert!(e.to_string().contains(hint), "{v}: {e}");
    }
    let e = load(MINIMAL, &["train.save_every=steps"]).unwrap_err();
    assert!(e.to_string().contains("save_steps"), "{e}");
    // An epoch's evaluations need held-out pairs as a step interval's do.
    let mut c = load(MINIMAL, &["train.eval_every=epoch"]).unwrap();
    c.data.train = Some("pairs.jsonl".into());
    let e = c.validate_for_train().unwrap_err();
    assert!(e.to_string().contains("eval_every = \"epoch\""), "{e}");
}

/// transformers' `logging_steps`/`eval_steps`/`save_steps` below 1: a share of the run's
/// steps, rounded up (`math.ceil(max_steps * x)`); 1.0 is one step.
#[test]
fn intervals_may_be_a_fraction_of_the_run() {
    let c = load(
        MINIMAL,
        &[
            "train.log_every=0.25",
            "train.eval_every=0.3",
            "train.save_every=1.0",
        ],
    )
    .unwrap();
    assert_eq!(c.train.log_every, Interval::Fraction(0.25));
    assert_eq!(c.train.eval_every, Interval::Fraction(0.3));
    assert_eq!(c.train.save_every, Interval::Steps(1));
    let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
    assert_eq!(back, c);
    let c = load("[model]\nid = \"m\"\n[train]\nlog_every = 0.5\n", &[]).unwrap();
    assert_eq!(c.train.log_every, Interval::Fraction(0.5));
    // ceil(10 × 0.25) = 3, ceil(10 × 0.3) = 3 (the product is 3.0 in f64, as in Python),
    // ceil(7 × 0.3) = 3, ceil(1 × 0.01) = 1.
    for (f, total, steps) in [(0.25, 10, 3), (0.3, 10, 3), (0.3, 7, 3), (0.01, 1, 1)] {
        assert_eq!(
            Interval::Fraction(f).resolve(total),
            Interval::Steps(steps),
            "{f} of {total}"
        );
    }
    assert_eq!(Interval::Epoch.resolve(10), Interval::Epoch);
    assert_eq!(Interval::Steps(4).resolve(10), Interval::Steps(4));
    // log_every takes "epoch" too (transformers' logging_strategy), never 0.
    let c = load(MINIMAL, &["train.log_every=epoch"]).unwrap();
    assert_eq!(c.train.log_every, Interval::Epoch);
    let e = load(MINIMAL, &["train.log_every=0"]).unwrap_err();
    assert_eq!(e.key(), Some("train.log_every"), "{e}");
}

#[test]
fn epochs_may_be_a_fraction() {
    let c = load(MINIMAL, &["train.epochs=2.5"]).unwrap();
    assert_eq!(c.train.epochs, 2.5);
    assert_eq!(
        load(MINIMAL, &["train.epochs=3"]).unwrap().train.epochs,
        3.0
    );
    for v in ["-1", "nan", "inf", "\"two\""] {
        let e = load(MINIMAL, &[&format!("train.epochs={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("train.epochs"), "{v}: {e}");
    }
    let e = load(MINIMAL, &["train.epochs=0"]).unwrap_err();
    assert!(e.to_string().contains("would train nothing"), "{e}");
}

#[test]
fn save_dtype_takes_transformers_names() {
    assert_eq!(load(MINIMAL, &[]).unwrap().train.save_dtype, SaveDtype::F32);
    for (v, want) in [
        ("bfloat16", SaveDtype::Bf16),
        ("bf16", SaveDtype::Bf16),
        ("float16", SaveDtype::F16),
        ("f32", SaveDtype::F32),
        ("auto", SaveDtype::Auto),
    ] {
        let c = load(MINIMAL, &[&format!("train.save_dtype={v}")]).unwrap();
        assert_eq!(c.train.save_dtype, want, "{v}");
        let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
        assert_eq!(back, c);
    }
    let e = load(MINIMAL, &["train.save_dtype=int8"]).unwrap_err();
    assert_eq!(e.key(), Some("train.save_dtype"), "{e}");
    assert!(e.to_string().contains("bfloat16"), "{e}");
    let e = load("[model]\nid = \"m\"\n[train]\nsave_dtype = 16\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("train.save_dtype"), "{e}");
}

#[test]
fn a_string_target_is_a_peft_pattern() {
    let text = "[model]\nid = \"m\"\n[lora]\ntargets = 'model\\.layers\\.0\\..*(q|v)_proj'\n";
    let c = load(text, &[]).unwrap();
    assert_eq!(
        c.lora.targets,
        LoraTargets::Pattern(r"model\.layers\.0\..*(q|v)_proj".into())
    );
    let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
    assert_eq!(back, c);
    let c = load(MINIMAL, &[r"lora.targets=.*\.(q|v)_proj"]).unwrap();
    assert_eq!(
        c.lora.targets,
        LoraTargets::Pattern(r".*\.(q|v)_proj".into())
    );
    // Python's look-around reads as PEFT's re does.
    load(MINIMAL, &[r"lora.targets=.*(?<!o)_proj"]).unwrap();
    // An unbalanced `)` must not escape the full-match anchoring (Python refuses it), and a
    // verbose flag's comment would swallow it.
    for bad in [
        "(q_proj",
        "",
        "*q",
        ".*gate)|(.*q_proj",
        "(?x) .*q_proj # c",
    ] {
        let e = load(MINIMAL, &[&format!("lora.targets='{bad}'")]).unwrap_err();
        assert_eq!(e.key(), Some("lora.targets"), "{bad}: {e}");
    }
}

#[test]
fn lora_target_overrides_keep_patterns_whole() {
    // PEFT compares "all-linear" without case.
    let c = load(MINIMAL, &["lora.targets=All-Linear"]).unwrap();
    assert_eq!(c.lora.targets, LoraTargets::AllLinear);
    // A comma inside a pattern's repetition does not split it into module names.
    let c = load(
        MINIMAL,
        &[r"lora.targets=.*layers\.[0-9]{1,2}\.self_attn\.q_proj"],
    )
    .unwrap();
    assert_eq!(
        c.lora.targets,
        LoraTargets::Pattern(r".*layers\.[0-9]{1,2}\.self_attn\.q_proj".into())
    );
    assert_eq!(
        load(MINIMAL, &["lora.targets=q_proj, v_proj"])
            .unwrap()
            .lora
            .targets,
        LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
    );
    // A backslash in double quotes is a TOML escape: refused with the single-quote spelling.
    let e = load(MINIMAL, &[r#"lora.targets="model\.layers\..*""#]).unwrap_err();
    assert!(e.to_string().contains("single quotes"), "{e}");
    let c = load(MINIMAL, &[r"lora.targets='model\.layers\..*'"]).unwrap();
    assert_eq!(
        c.lora.targets,
        LoraTargets::Pattern(r"model\.layers\..*".into())
    );
}

#[test]
fn quantize_takes_nf4_with_or_without_double_quantization() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(
        (c.lora.quantize, c.lora.double_quant),
        (BaseQuant::None, false)
    );
    let on = [
        "lora.enabled=true",
        "lora.quantize=nf4",
        "lora.double_quant=true",
        "data.train=a.jsonl",
    ];
    let c = load(MINIMAL, &on).unwrap();
    assert_eq!(
        (c.lora.quantize, c.lora.double_quant),
        (BaseQuant::Nf4, true)
    );
    c.validate_for_train().unwrap();
    let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
    assert_eq!(back, c);
    for (v, hint) in [
        ("fp4", "not supported"),
        ("4bit", "load_in_4bit"),
        ("q4", "valid"),
    ] {
        let e = load(MINIMAL, &[&format!("lora.quantize={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("lora.quantize"), "{v}: {e}");
        assert!(e.to_string().contains(hint), "{v}: {e}");
    }
    let e = load("[model]\nid = \"m\"\n[lora]\nquantize = true\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("lora.quantize"), "{e}");
    let e = load(MINIMAL, &["lora.double_quant=true"]).unwrap_err();
    assert_eq!(e.key(), Some("lora.double_quant"), "{e}");
    // Training a quantized base needs adapters; evaluating one does not read lora.enabled.
    let c = load(MINIMAL, &["lora.quantize=nf4", "data.train=a.jsonl"]).unwrap();
    let e = c.validate_for_train().unwrap_err();
    assert_eq!(e.key(), Some("lora.quantize"), "{e}");
    assert!(e.to_string().contains("lora.enabled = true"), "{e}");
}

#[test]
fn optimizer_takes_transformers_names() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.optim.optimizer, Optimizer::AdamWTorch);
    for (name, want) in [
        ("adamw_torch", Optimizer::AdamWTorch),
        ("adamw_torch_fused", Optimizer::AdamWTorch),
        ("adamw_8bit", Optimizer::AdamW8bit),
        ("adamw_bnb_8bit", Optimizer::AdamW8bit),
        ("paged_adamw_8bit", Optimizer::AdamW8bit),
    ] {
        let c = load(MINIMAL, &[&format!("optim.optimizer={name}")]).unwrap();
        assert_eq!(c.optim.optimizer, want, "{name}");
        let c = load(
            &format!("[optim]\noptimizer = \"{name}\"\n"),
            &["model.id=m"],
        )
        .unwrap();
        assert_eq!(c.optim.optimizer, want, "{name} in the file");
        // Saved under its canonical name, read back the same.
        let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
        assert_eq!(back, c);
        assert!(c
            .to_toml_string()
            .contains(&format!("optimizer = \"{}\"", want.as_str())));
    }
    for (v, hint) in [
        ("adamw_hf", "\"adamw_torch\" is torch's AdamW"),
        ("adafactor", "adamw_bnb_8bit"),
        ("sgd", "valid"),
    ] {
        let e = load(MINIMAL, &[&format!("optim.optimizer={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("optim.optimizer"), "{v}: {e}");
        assert!(e.to_string().contains(hint), "{v}: {e}");
    }
    let e = load("[model]\nid = \"m\"\n[optim]\noptimizer = 8\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("optim.optimizer"), "{e}");
    // The schema's spelling of transformers' key is suggested for it.
    let e = load(
        "[model]\nid = \"m\"\n[optim]\noptim = \"adamw_8bit\"\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("optim.optimizer"), "{e}");
}

/// transformers' `load_best_model_at_end` settings and their requirements.
#[test]
fn the_best_model_needs_evaluations_and_checkpoints_on_one_schedule() {
    let c = load(MINIMAL, &[]).unwrap();
    assert!(!c.train.load_best_model_at_end);
    assert_eq!(c.train.best_metric_key(), "eval_loss");
    assert!(!c.train.best_is_greater());
    let on = |sets: &[&str]| {
        let mut all = vec!["train.load_best_model_at_end=true"];
        all.extend_from_slice(sets);
        load(MINIMAL, &all)
    };
    for (sets, key, greater) in [
        (
            &["train.eval_every=2", "train.save_every=4"][..],
            "eval_loss",
            false,
        ),
        (
            &[
                "train.eval_every=epoch",
                "train.save_every=epoch",
                "train.metric_for_best_model=rewards/accuracies",
            ][..],
            "eval_rewards/accuracies",
            true,
        ),
        (
            &[
                // 0.3 % 0.1 is not 0 in floats; in millionths it is, as transformers checks.
                "train.eval_every=0.1",
                "train.save_every=0.3",
                "train.metric_for_best_model=eval_nll_loss",
            ][..],
            "eval_nll_loss",
            false,
        ),
        (
            &[
                "train.eval_every=3",
                "train.save_every=3",
                "train.metric_for_best_model=loss",
                "train.greater_is_better=true",
            ][..],
            "eval_loss",
            true,
        ),
    ] {
        let c = on(sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        assert_eq!(c.train.best_metric_key(), key, "{sets:?}");
        assert_eq!(c.train.best_is_greater(), greater, "{sets:?}");
        let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
        assert_eq!(back, c);
    }
    for (sets, says) in [
        (&["train.save_every=4"][..], "set train.eval_every"),
        (&["train.eval_every=4"][..], "set train.save_every"),
        (
            &["train.eval_every=4", "train.save_every=6"][..],
            "multiple",
        ),
        (
            &["train.eval_every=4", "train.save_every=epoch"][..],
            "multiple",
        ),
        (
            &["train.eval_every=0.2", "train.save_every=3"][..],
            "both fractions",
        ),
        (
            &["train.eval_every=0.2", "train.save_every=0.3"][..],
            "multiple",
        ),
    ] {
        let e = on(sets).unwrap_err();
        assert_eq!(
            e.key(),
            Some("train.load_best_model_at_end"),
            "{sets:?}: {e}"
        );
        assert!(e.to_string().contains(says), "{sets:?}: {e}");
    }
    let e = load(MINIMAL, &["train.metric_for_best_model=accuracy"]).unwrap_err();
    assert_eq!(e.key(), Some("train.metric_for_best_model"), "{e}");
    assert!(e.to_string().contains("rewards/accuracies"), "{e}");
    // Evaluations need held-out pairs, as any eval_every does.
    let mut c = on(&["train.eval_every=2", "train.save_every=2"]).unwrap();
    c.data.train = Some("pairs.jsonl".into());
    assert!(c.validate_for_train().is_err());
}

#[test]
fn eval_delay_is_a_finite_non_negative_number() {
    assert_eq!(load(MINIMAL, &[]).unwrap().train.eval_delay, 0.0);
    for v in ["7", "6.5"] {
        let c = load(MINIMAL, &[&format!("train.eval_delay={v}")]).unwrap();
        assert_eq!(c.train.eval_delay, v.parse::<f64>().unwrap());
    }
    for v in ["-1", "inf", "nan"] {
        let e = load(MINIMAL, &[&format!("train.eval_delay={v}")]).unwrap_err();
        assert_eq!(e.key(), Some("train.eval_delay"), "{v}: {e}");
    }
}

/// Early stopping's requirements (transformers' `EarlyStoppingCallback` asserts a metric and
/// an evaluation strategy), and evaluations at the start, which need held-out pairs.
#[test]
fn early_stopping_needs_a_metric_and_evaluations() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.train.early_stopping_patience, 0);
    assert_eq!(c.train.early_stopping_threshold, 0.0);
    assert!(!c.train.eval_on_start && !c.train.logging_first_step);
    for sets in [
        &[
            "train.early_stopping_patience=3",
            "train.early_stopping_threshold=0.01",
            "train.metric_for_best_model=loss",
            "train.eval_every=5",
        ][..],
        &[
            "train.early_stopping_patience=1",
            "train.load_best_model_at_end=true",
            "train.eval_every=epoch",
            "train.save_every=epoch",
        ][..],
    ] {
        let c = load(MINIMAL, sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
        assert_eq!(back, c);
    }
    for (sets, key, says) in [
        (
            &["train.early_stopping_patience=2", "train.eval_every=5"][..],
            "train.early_stopping_patience",
            "metric_for_best_model",
        ),
        (
            &[
                "train.early_stopping_patience=2",
                "train.metric_for_best_model=loss",
            ][..],
            "train.early_stopping_patience",
            "train.eval_every",
        ),
        (
            &["train.early_stopping_threshold=0.1"][..],
            "train.early_stopping_threshold",
            "early_stopping_patience",
        ),
        (
            &[
                "train.early_stopping_patience=2",
                "train.metric_for_best_model=loss",
                "train.eval_every=5",
                "train.early_stopping_threshold=-0.1",
            ][..],
            "train.early_stopping_threshold",
            ">= 0",
        ),
    ] {
        let e = load(MINIMAL, sets).unwrap_err();
        assert_eq!(e.key(), Some(key), "{sets:?}: {e}");
        assert!(e.to_string().contains(says), "{sets:?}: {e}");
    }
    let mut c = load(MINIMAL, &["train.eval_on_start=true"]).unwrap();
    c.data.train = Some("pairs.jsonl".into());
    let e = c.validate_for_train().unwrap_err();
    assert_eq!(e.key(), Some("train.eval_on_start"), "{e}");
    c.data.eval = Some("held.jsonl".into());
    c.validate_for_train().unwrap();
}

/// `train.save_every = "best"`: transformers' `save_strategy = "best"`, which needs a metric
/// and evaluations but no common schedule with them; no other interval takes it.
#[test]
fn saving_at_the_best_needs_a_metric_and_evaluations() {
    for sets in [
        &[
            "train.save_every=best",
            "train.metric_for_best_model=loss",
            "train.eval_every=3",
        ][..],
        &[
            "train.save_every=best",
            "train.load_best_model_at_end=true",
            "train.eval_every=0.3",
        ][..],
    ] {
        let c = load(MINIMAL, sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        assert_eq!(c.train.save_every, Interval::Best);
        let back = Config::from_toml_str(&c.to_toml_string(), "orpo.toml", &[]).unwrap();
        assert_eq!(back, c);
    }
    for (sets, key, says) in [
        (
            &["train.save_every=best", "train.eval_every=3"][..],
            "train.save_every",
            "metric_for_best_model",
        ),
        (
            &["train.save_every=best", "train.metric_for_best_model=loss"][..],
            "train.save_every",
            "train.eval_every",
        ),
        (
            &["train.eval_every=best", "train.save_every=best"][..],
            "train.eval_every",
            "save strategy",
        ),
        (
            &["train.log_every=best"][..],
            "train.log_every",
            "save strategy",
        ),
    ] {
        let e = load(MINIMAL, sets).unwrap_err();
        assert_eq!(e.key(), Some(key), "{sets:?}: {e}");
        assert!(e.to_string().contains(says), "{sets:?}: {e}");
    }
}

/// Values that would turn training into nonsense or NaN, refused by name; a `--set` integer
/// too large for TOML is said to be one.
#[test]
fn nonsense_optimizer_values_and_huge_integers_are_refused() {
    for (sets, key, says) in [
        (&["optim.adam_epsilon=0"][..], "optim.adam_epsilon", "> 0"),
        (
            &[
                "optim.scheduler=cosine_with_min_lr",
                "optim.lr=1e-3",
                "optim.min_lr=5",
            ][..],
            "optim.min_lr",
            "above it",
        ),
        (
            &["train.max_steps=18446744073709551615"][..],
            "train.max_steps",
            "too large",
        ),
        (
            &["train.eval_every=99999999999999999999"][..],
            "train.eval_every",
            "too large",
        ),
    ] {
        let e = load(MINIMAL, sets).unwrap_err();
        assert_eq!(e.key(), Some(key), "{sets:?}: {e}");
        assert!(e.to_string().contains(says), "{sets:?}: {e}");
    }
    // min_lr equal to lr is a constant rate, as a min_lr_rate of 1.
    load(
        MINIMAL,
        &[
            "optim.scheduler=cosine_with_min_lr",
            "optim.lr=1e-3",
            "optim.min_lr=1e-3",
        ],
    )
    .unwrap();
    // A quoted small number is still the wrong type, not a large one.
    let e = load("[model]\nid = \"m\"\n[train]\nmax_steps = \"5\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("expected an integer"), "{e}");
}

//! Value ranges, checked once the configuration is deserialised.

use super::load::Origin;
use super::{BaseQuant, Config, ConfigError, Interval, LoraTargets};

impl Config {
    /// The schedules' arguments: each only with a schedule that reads it, in its range.
    fn check_schedule_args(&self, o: &Origin) -> Result<(), ConfigError> {
        use super::Scheduler as S;
        let p = &self.optim;
        let args = [
            (
                "optim.num_cycles",
                p.num_cycles,
                &[S::Cosine, S::CosineWithMinLr, S::CosineWithRestarts][..],
            ),
            (
                "optim.min_lr_rate",
                p.min_lr_rate,
                &[S::CosineWithMinLr][..],
            ),
            ("optim.min_lr", p.min_lr, &[S::CosineWithMinLr][..]),
            ("optim.lr_end", p.lr_end, &[S::Polynomial][..]),
            ("optim.power", p.power, &[S::Polynomial][..]),
        ];
        for (key, value, users) in args {
            let Some(v) = value else { continue };
            if !users.contains(&p.scheduler) {
                let names: Vec<&str> = users.iter().map(|s| s.as_str()).collect();
                return Err(o.invalid(
                    key,
                    format!(
                        "is read only by optim.scheduler = {}; the scheduler is {}",
                        names.join(" or "),
                        p.scheduler
                    ),
                ));
            }
            let ok = match key {
                "optim.min_lr_rate" => (0.0..=1.0).contains(&v),
                "optim.min_lr" | "optim.lr_end" => v.is_finite() && v >= 0.0,
                _ => v.is_finite() && v > 0.0,
            };
            if !ok {
                let range = match key {
                    "optim.min_lr_rate" => "in [0, 1]",
                    "optim.min_lr" | "optim.lr_end" => "a finite number >= 0",
                    _ => "a finite number > 0",
                };
                return Err(o.invalid(key, format!("must be {range}, found {v}")));
            }
        }
        if p.scheduler == S::CosineWithMinLr {
            match (p.min_lr_rate, p.min_lr) {
                (Some(_), Some(_)) => {
                    return Err(o.invalid(
                        "optim.min_lr",
                        "optim.min_lr_rate is set too; use one of them",
                    ))
                }
                (None, None) => {
                    return Err(o.invalid(
                        "optim.scheduler",
                        "cosine_with_min_lr needs its floor: optim.min_lr_rate (a fraction of optim.lr) or optim.min_lr",
                    ))
                }
                _ => {}
            }
        }
        if let (S::CosineWithMinLr, Some(min)) = (p.scheduler, p.min_lr) {
            if min > p.lr {
                return Err(o.invalid(
                    "optim.min_lr",
                    format!(
                        "is the floor cosine_with_min_lr decays optim.lr = {} to, found {min}, \
                         which is above it",
                        p.lr
                    ),
                ));
            }
        }
        if p.scheduler == S::Polynomial {
            let end = p
                .lr_end
                .unwrap_or(crate::train::schedule::POLYNOMIAL_LR_END);
            if end >= p.lr {
                // The key the user can change: lr_end if they set it, else lr.
                let (key, msg) = match p.lr_end {
                    Some(_) => (
                        "optim.lr_end",
                        format!(
                            "polynomial decays from optim.lr = {} to lr_end = {end}, which must be smaller",
                            p.lr
                        ),
                    ),
                    None => (
                        "optim.lr",
                        format!(
                            "polynomial decays from lr = {} to optim.lr_end, {end} when unset, which must be smaller; set optim.lr_end below lr",
                            p.lr
                        ),
                    ),
                };
                return Err(o.invalid(key, msg));
            }
        }
        Ok(())
    }

    pub(super) fn check_ranges(&self, o: &Origin) -> Result<(), ConfigError> {
        let m = &self.model;
        if m.id.trim().is_empty() {
            return Err(o.invalid("model.id", "must not be empty"));
        }
        if let Some(r) = &m.revision {
            if r.trim().is_empty() {
                return Err(o.invalid("model.revision", "must not be empty (omit it for main)"));
            }
        }
        if !valid_device(&m.device) {
            return Err(o.invalid(
                "model.device",
                format!(
                    "unknown device `{}`; valid: cpu, cuda, cuda:N, auto",
                    m.device
                ),
            ));
        }

        let d = &self.data;
        for (key, v) in [("data.train", &d.train), ("data.eval", &d.eval)] {
            if let Some(files) = v {
                if files.0.is_empty() || files.0.iter().any(|s| s.trim().is_empty()) {
                    return Err(o.invalid(key, "must not be empty (omit the key instead)"));
                }
            }
        }
        for (key, v) in [
            ("data.train_split", &d.train_split),
            ("data.eval_split", &d.eval_split),
            ("data.prompt_column", &d.prompt_column),
            ("data.chosen_column", &d.chosen_column),
            ("data.rejected_column", &d.rejected_column),
        ] {
            if v.trim().is_empty() {
                return Err(o.invalid(key, "must not be empty"));
            }
        }
        for (key, v) in [("data.subset", &d.subset), ("data.revision", &d.revision)] {
            if matches!(v, Some(s) if s.trim().is_empty()) {
                return Err(o.invalid(key, "must not be empty (omit the key instead)"));
            }
        }
        let cols = [
            ("data.prompt_column", &d.prompt_column),
            ("data.chosen_column", &d.chosen_column),
            ("data.rejected_column", &d.rejected_column),
        ];
        for (i, (key, v)) in cols.iter().enumerate() {
            if let Some((other, _)) = cols[..i].iter().find(|(_, w)| w == v) {
                return Err(o.invalid(
                    key,
                    format!(
                        "column `{v}` is already used by {other}; each field needs its own column"
                    ),
                ));
            }
        }
        if let Some(x) = d.eval_size {
            if d.eval.is_some() {
                return Err(o.invalid(
                    "data.eval_size",
                    "data.eval is set too; hold out training pairs or name eval data, not both",
                ));
            }
            if !(x.is_finite() && x > 0.0 && (x < 1.0 || x.fract() == 0.0)) {
                return Err(o.invalid(
                    "data.eval_size",
                    format!("must be a fraction in (0, 1) or a whole number of pairs, found {x}"),
                ));
            }
        }
        if matches!(&d.chat_template, Some(t) if t.trim().is_empty()) {
            return Err(o.invalid(
                "data.chat_template",
                "must not be empty (omit it for the model's own)",
            ));
        }
        if d.max_length == 0 {
            return Err(o.invalid("data.max_length", "must be at least 1"));
        }
        if d.max_prompt_length == 0 {
            return Err(o.invalid("data.max_prompt_length", "must be at least 1"));
        }
        if d.max_prompt_length > d.max_length {
            return Err(o.invalid(
                "data.max_prompt_length",
                format!(
                    "{} is larger than data.max_length = {}",
                    d.max_prompt_length, d.max_length
                ),
            ));
        }

        let beta = self.orpo.beta;
        if !beta.is_finite() || beta < 0.0 {
            return Err(o.invalid(
                "orpo.beta",
                format!("must be a finite number >= 0, found {beta}"),
            ));
        }

        let p = &self.optim;
        if !p.lr.is_finite() || p.lr <= 0.0 {
            return Err(o.invalid(
                "optim.lr",
                format!("must be a finite number > 0, found {}", p.lr),
            ));
        }
        for (key, v) in [
            ("optim.weight_decay", p.weight_decay),
            ("optim.max_grad_norm", p.max_grad_norm),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(o.invalid(key, format!("must be a finite number >= 0, found {v}")));
            }
        }
        for (key, v) in [
            ("optim.adam_beta1", p.adam_beta1),
            ("optim.adam_beta2", p.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(o.invalid(key, format!("must be in [0, 1), found {v}")));
            }
        }
        self.check_schedule_args(o)?;
        if !(0.0..=1.0).contains(&p.warmup_ratio) {
            return Err(o.invalid(
                "optim.warmup_ratio",
                format!("must be in [0, 1], found {}", p.warmup_ratio),
            ));
        }
        if p.warmup_ratio > 0.0 && p.warmup_steps > 0 {
            return Err(o.invalid(
                "optim.warmup_ratio",
                format!(
                    "optim.warmup_steps = {} is set too; use one of them (warmup_steps = 0 for the ratio)",
                    p.warmup_steps
                ),
            ));
        }
        // torch takes 0, then divides 0 by 0 for any gradient element that is 0 (the row of
        // a token the step never saw) and the weights turn NaN.
        if !p.adam_epsilon.is_finite() || p.adam_epsilon <= 0.0 {
            return Err(o.invalid(
                "optim.adam_epsilon",
                format!(
                    "must be a finite number > 0 (AdamW divides by sqrt(v) + eps, and v is 0 \
                     wherever the gradient has been), found {}",
                    p.adam_epsilon
                ),
            ));
        }

        let t = &self.train;
        if t.batch_size == 0 {
            return Err(o.invalid("train.batch_size", "must be at least 1"));
        }
        if t.eval_batch_size == Some(0) {
            return Err(o.invalid(
                "train.eval_batch_size",
                "must be at least 1 (omit it to evaluate in batches of train.batch_size)",
            ));
        }
        if t.grad_accum == 0 {
            return Err(o.invalid("train.grad_accum", "must be at least 1"));
        }
        if !t.epochs.is_finite() || t.epochs < 0.0 {
            return Err(o.invalid(
                "train.epochs",
                format!(
                    "must be a non-negative number of passes, found {}",
                    t.epochs
                ),
            ));
        }
        if t.epochs == 0.0 && t.max_steps == 0 {
            let key = if o.overridden.contains("train.max_steps") {
                "train.max_steps"
            } else {
                "train.epochs"
            };
            return Err(o.invalid(
                key,
                "train.epochs = 0 with train.max_steps = 0 would train nothing; set one of them",
            ));
        }
        if t.log_every == Interval::Never {
            return Err(o.invalid("train.log_every", "must be at least 1"));
        }
        for (key, every) in [
            ("train.log_every", t.log_every),
            ("train.eval_every", t.eval_every),
        ] {
            if every == Interval::Best {
                return Err(o.invalid(
                    key,
                    "\"best\" is a save strategy: train.save_every = \"best\" saves at each \
                     evaluation that is a new best",
                ));
            }
        }
        if t.save_every == Interval::Best {
            let key = "train.save_every";
            if !t.tracks_best() {
                return Err(o.invalid(
                    key,
                    "\"best\" saves at evaluations that beat all before them by a metric: set \
                     train.metric_for_best_model (\"loss\" for eval_loss) or \
                     train.load_best_model_at_end",
                ));
            }
            if !t.eval_every.is_set() {
                return Err(o.invalid(
                    key,
                    "\"best\" saves at evaluations: set train.eval_every (and data.eval)",
                ));
            }
        }
        self.check_best_model(o)?;
        self.check_early_stopping(o)?;
        if t.save_total_limit == Some(0) {
            return Err(o.invalid(
                "train.save_total_limit",
                "must be at least 1 (omit it to keep every checkpoint)",
            ));
        }
        if t.output_dir.trim().is_empty() {
            return Err(o.invalid("train.output_dir", "must not be empty"));
        }

        let l = &self.lora;
        if l.r == 0 {
            return Err(o.invalid("lora.r", "must be at least 1"));
        }
        if !l.alpha.is_finite() || l.alpha <= 0.0 {
            return Err(o.invalid(
                "lora.alpha",
                format!("must be a finite number > 0, found {}", l.alpha),
            ));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(o.invalid(
                "lora.dropout",
                format!("must be in [0, 1), found {}", l.dropout),
            ));
        }
        if l.init_from.is_some() && !l.enabled {
            return Err(o.invalid(
                "lora.init_from",
                "goes on training an adapter, which needs lora.enabled = true",
            ));
        }
        if l.double_quant && l.quantize == BaseQuant::None {
            return Err(o.invalid(
                "lora.double_quant",
                "quantizes the 4-bit scales, which needs lora.quantize = \"nf4\"",
            ));
        }
        if let LoraTargets::Pattern(p) = &l.targets {
            if let Err(e) = crate::model::lora::TargetPattern::new(p) {
                return Err(o.invalid("lora.targets", e));
            }
        }
        if let LoraTargets::Modules(m) = &l.targets {
            if m.is_empty() {
                return Err(o.invalid("lora.targets", "the list of modules is empty"));
            }
            if m.iter().any(|s| s.trim().is_empty()) {
                return Err(o.invalid("lora.targets", "empty module name"));
            }
        }
        Ok(())
    }
}

fn valid_device(d: &str) -> bool {
    match d {
        "cpu" | "cuda" | "auto" => true,
        _ => d
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
    }
}

impl Config {
    /// `train.load_best_model_at_end`'s requirements, as transformers states them: evaluations
    /// and checkpoints on the same schedule (both at epochs' ends, or checkpoints every
    /// multiple of the evaluations' steps, fractions with fractions), and a metric evaluations
    /// report.
    fn check_best_model(&self, o: &Origin) -> Result<(), ConfigError> {
        let t = &self.train;
        if let Some(m) = &t.metric_for_best_model {
            let name = m.strip_prefix("eval_").unwrap_or(m);
            if name != "loss" && !crate::train::loss::METRIC_NAMES.contains(&name) {
                return Err(o.invalid(
                    "train.metric_for_best_model",
                    format!(
                        "`{m}` is not an evaluation metric; valid: loss, {} (each also with \
                         eval_ before it)",
                        crate::train::loss::METRIC_NAMES.join(", ")
                    ),
                ));
            }
        }
        if !t.load_best_model_at_end {
            return Ok(());
        }
        let key = "train.load_best_model_at_end";
        let (save, eval) = (t.save_every, t.eval_every);
        let compatible =
            match (save, eval) {
                (_, Interval::Never) => return Err(o.invalid(
                    key,
                    "compares evaluations during training: set train.eval_every (and data.eval)",
                )),
                (Interval::Never, _) => {
                    return Err(o.invalid(
                        key,
                        "loads the best checkpoint: set train.save_every to a multiple of \
                     train.eval_every",
                    ))
                }
                // transformers: any evaluation schedule (each new best is saved).
                (Interval::Best, _) => true,
                (Interval::Epoch, Interval::Epoch) => true,
                (Interval::Epoch, _) | (_, Interval::Epoch) => false,
                // transformers' test, on the numbers as given: a fraction pairs only with a
                // fraction, compared in millionths where the float remainder is not 0.
                _ => {
                    let number = |i: Interval| match i {
                        Interval::Steps(n) => n as f64,
                        Interval::Fraction(f) => f,
                        Interval::Never | Interval::Epoch | Interval::Best => 0.0,
                    };
                    let (s, e) = (number(save), number(eval));
                    s % e == 0.0 || (s < 1.0 && e < 1.0 && (s * 1e6) % (e * 1e6) == 0.0)
                }
            };
        if !compatible {
            return Err(o.invalid(
                key,
                format!(
                    "needs a checkpoint at evaluations: train.save_every ({save}) must be a \
                     multiple of train.eval_every ({eval}), both steps, both fractions of the \
                     run or both \"epoch\""
                ),
            ));
        }
        Ok(())
    }

    /// transformers' `EarlyStoppingCallback` asserts a metric and evaluations during training.
    fn check_early_stopping(&self, o: &Origin) -> Result<(), ConfigError> {
        let t = &self.train;
        if !t.eval_delay.is_finite() || t.eval_delay < 0.0 {
            return Err(o.invalid(
                "train.eval_delay",
                format!("must be a finite number >= 0, got {}", t.eval_delay),
            ));
        }
        let threshold = t.early_stopping_threshold;
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(o.invalid(
                "train.early_stopping_threshold",
                format!("must be a finite number >= 0, got {threshold}"),
            ));
        }
        if t.early_stopping_patience == 0 {
            if threshold != 0.0 {
                return Err(o.invalid(
                    "train.early_stopping_threshold",
                    "is read only by early stopping: set train.early_stopping_patience too",
                ));
            }
            return Ok(());
        }
        let key = "train.early_stopping_patience";
        if !t.tracks_best() {
            return Err(o.invalid(
                key,
                "compares evaluations by a metric: set train.metric_for_best_model (\"loss\" for \
                 eval_loss) or train.load_best_model_at_end",
            ));
        }
        if !t.eval_every.is_set() {
            return Err(o.invalid(
                key,
                "stops after evaluations that do not improve: set train.eval_every (and \
                 data.eval)",
            ));
        }
        Ok(())
    }
}

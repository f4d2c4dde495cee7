//! The ORPO odds-ratio term and the metrics TRL reports, on per-pair mean answer log-probs.
//!
//! This part works on B scalars per micro-batch, so it runs in f64 with written derivatives:
//! stable `log1mexp`, and no need for `log1p`/`expm1`, which candle lacks. The metrics are
//! computed here on the host; the derivatives that enter the objective also come from an op on
//! the log-probs' device (`odds_coefs.rs`, this arithmetic), so a step reads the device once.

/// `log(1 - e^a)` for `a <= 0`, stable near 0 and for very negative `a`.
pub fn log1mexp(a: f64) -> f64 {
    if a < -std::f64::consts::LN_2 {
        (-a.exp()).ln_1p()
    } else {
        (-a.exp_m1()).ln()
    }
}

/// d/da log(1 - e^a) = -1 / expm1(-a).
fn d_log1mexp(a: f64) -> f64 {
    -1.0 / (-a).exp_m1()
}

pub fn log_sigmoid(z: f64) -> f64 {
    z.min(0.0) - (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Log odds ratio `z` of one pair.
pub fn log_odds(lp_w: f64, lp_l: f64) -> f64 {
    (lp_w - lp_l) - (log1mexp(lp_w) - log1mexp(lp_l))
}

/// `-beta * mean_i logsigmoid(z_i)` and its gradient with respect to each `lp_w(i)`, `lp_l(i)`.
pub struct OddsTerm {
    pub value: f64,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    pub z: Vec<f64>,
    pub log_sigmoid_z: Vec<f64>,
}

pub fn odds_term(lp_w: &[f64], lp_l: &[f64], beta: f64) -> OddsTerm {
    let b = lp_w.len() as f64;
    let mut out = OddsTerm {
        value: 0.0,
        d_chosen: Vec::with_capacity(lp_w.len()),
        d_rejected: Vec::with_capacity(lp_w.len()),
        z: Vec::with_capacity(lp_w.len()),
        log_sigmoid_z: Vec::with_capacity(lp_w.len()),
    };
    for (&w, &l) in lp_w.iter().zip(lp_l) {
        let z = log_odds(w, l);
        let ls = log_sigmoid(z);
        out.value -= beta * ls / b;
        // d(-beta/B * logsigmoid(z)) = -beta/B * sigmoid(-z) * dz
        let c = -beta / b * sigmoid(-z);
        out.d_chosen.push(c * (1.0 - d_log1mexp(w)));
        out.d_rejected.push(c * (-1.0 + d_log1mexp(l)));
        out.z.push(z);
        out.log_sigmoid_z.push(ls);
    }
    out
}

/// TRL's metric names, in TRL's order.
pub const METRIC_NAMES: [&str; 11] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/rejected",
    "logps/chosen",
    "logits/rejected",
    "logits/chosen",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
];

/// Loss and metrics of one micro-batch (or their mean over several).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    /// Values in the order of `METRIC_NAMES`.
    pub values: [f64; 11],
}

impl Metrics {
    /// Builds the metrics from per-pair mean log-probs and the batch-level NLL and logit means.
    pub fn from_parts(
        lp_w: &[f64],
        lp_l: &[f64],
        beta: f64,
        nll: f64,
        logits_chosen: f64,
        logits_rejected: f64,
    ) -> (Self, OddsTerm) {
        let odds = odds_term(lp_w, lp_l, beta);
        let mean = |v: &mut dyn Iterator<Item = f64>| {
            let (s, c) = v.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
            s / c.max(1) as f64
        };
        let mw = mean(&mut lp_w.iter().copied());
        let ml = mean(&mut lp_l.iter().copied());
        let acc = mean(
            &mut lp_w
                .iter()
                .zip(lp_l)
                .map(|(w, l)| f64::from(u8::from(w > l))),
        );
        let values = [
            beta * mw,
            beta * ml,
            acc,
            beta * (mw - ml),
            ml,
            mw,
            logits_rejected,
            logits_chosen,
            nll,
            mean(&mut odds.log_sigmoid_z.iter().copied()),
            mean(&mut odds.z.iter().copied()),
        ];
        (
            Metrics {
                loss: nll + odds.value,
                values,
            },
            odds,
        )
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        if name == "loss" {
            return Some(self.loss);
        }
        METRIC_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| self.values[i])
    }

    /// Plain mean of several micro-batches' metrics (how TRL averages within a step).
    pub fn mean(items: &[Metrics]) -> Metrics {
        let n = items.len().max(1) as f64;
        let mut out = Metrics::default();
        for m in items {
            out.loss += m.loss / n;
            for (o, v) in out.values.iter_mut().zip(m.values) {
                *o += v / n;
            }
        }
        out
    }

    /// Recomputes the six per-pair metrics (rewards/*, logps/*) over the given pairs only,
    /// keeping loss, NLL, logits and the odds-ratio means, which are batch-level scalars.
    ///
    /// TRL's gathered metrics go through accelerate's `gather_for_metrics`, which keeps only
    /// the first `n_pairs % batch_size` pairs of every micro-batch computed after the
    /// dataloader's end is seen; with gradient accumulation that is each micro-batch of the
    /// epoch's last step, since the step's micro-batches are fetched before any runs.
    pub fn restrict_pair_metrics(&mut self, lp_w: &[f64], lp_l: &[f64], beta: f64) {
        let (sub, _) = Metrics::from_parts(lp_w, lp_l, beta, 0.0, 0.0, 0.0);
        self.values[..6].copy_from_slice(&sub.values[..6]);
    }

    /// `[loss, values...]`, for saving unlogged metrics in a checkpoint.
    pub fn to_vec(&self) -> Vec<f64> {
        std::iter::once(self.loss).chain(self.values).collect()
    }

    pub fn from_vec(v: &serde_json::Value) -> Option<Self> {
        let a = v.as_array()?;
        if a.len() != 1 + METRIC_NAMES.len() {
            return None;
        }
        let number = super::log::json_number;
        let mut m = Metrics {
            loss: number(&a[0])?,
            ..Metrics::default()
        };
        for (slot, x) in m.values.iter_mut().zip(&a[1..]) {
            *slot = number(x)?;
        }
        Some(m)
    }

    pub fn rewards_accuracy(&self) -> f64 {
        self.values[2]
    }
}

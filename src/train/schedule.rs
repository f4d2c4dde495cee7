//! Learning-rate schedules, exactly as `transformers.optimization` computes them.
//!
//! The learning rate of optimizer step `k` (counting from 0) is `lr * factor(k, W, T)`, which
//! is what `torch.optim.lr_scheduler.LambdaLR` applies: the lambda is evaluated at step 0 when
//! the scheduler is built, and again after every `scheduler.step()`.

use crate::config::{OptimConfig, Scheduler};

/// transformers' default `lr_end` of the polynomial schedule.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A schedule and its arguments (transformers' `lr_scheduler_kwargs`, defaults filled in).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Scheduler,
    /// Cosine waves: 0.5 for `cosine` and `cosine_with_min_lr`, 1 for `cosine_with_restarts`.
    pub num_cycles: f64,
    /// `cosine_with_min_lr`'s floor as a fraction of the base rate.
    pub min_lr_rate: f64,
    /// `polynomial`'s final rate as a fraction of the base rate, and its power.
    pub lr_end_rate: f64,
    pub power: f64,
}

impl Schedule {
    /// A schedule with transformers' default arguments.
    pub fn new(kind: Scheduler) -> Self {
        Schedule {
            kind,
            num_cycles: if kind == Scheduler::CosineWithRestarts {
                1.0
            } else {
                0.5
            },
            min_lr_rate: 0.0,
            lr_end_rate: 0.0,
            power: 1.0,
        }
    }

    /// The configured schedule (`optim.scheduler` and its arguments; the config checks them).
    pub fn from_config(o: &OptimConfig) -> Self {
        let mut s = Schedule::new(o.scheduler);
        if let Some(c) = o.num_cycles {
            s.num_cycles = c;
        }
        // transformers turns `min_lr` into `min_lr / lr` and `lr_end` into `lr_end / lr`.
        s.min_lr_rate = o.min_lr_rate.or(o.min_lr.map(|m| m / o.lr)).unwrap_or(0.0);
        s.lr_end_rate = o.lr_end.unwrap_or(POLYNOMIAL_LR_END) / o.lr;
        if let Some(p) = o.power {
            s.power = p;
        }
        s
    }

    /// Multiplier of the base learning rate for optimizer step `step` (from 0).
    ///
    /// `warmup` is `num_warmup_steps`, `total_steps` is `num_training_steps`. The formulas are
    /// those of transformers' `get_scheduler`, with `progress = (k - W) / max(1, T - W)`:
    ///
    /// - `constant`: always 1.0; `get_scheduler("constant", ...)` ignores the warmup.
    /// - every other schedule warms up as `k / max(1, W)` while `k < W`; then
    /// - `constant_with_warmup`: 1.
    /// - `linear`: `max(0, (T - k) / max(1, T - W))`.
    /// - `cosine`, `cosine_with_min_lr`: `f = 0.5 * (1 + cos(pi * 2 * num_cycles * progress))`,
    ///   then `max(0, f * (1 - min_lr_rate) + min_lr_rate)`.
    /// - `cosine_with_restarts`: 0 once `progress >= 1`, else
    ///   `max(0, 0.5 * (1 + cos(pi * ((num_cycles * progress) % 1))))`.
    /// - `polynomial`: `(1 - e) * (1 - progress)^power + e` with `e = lr_end / lr`, and `e`
    ///   past the end (`k > T`).
    /// - `inverse_sqrt`: `1 / sqrt((k + shift) / timescale)` with `timescale = W` (or 10000
    ///   when `W = 0`) and `shift = timescale - W`.
    pub fn factor(&self, step: usize, warmup: usize, total_steps: usize) -> f64 {
        let k = step as f64;
        let w = warmup as f64;
        let t = total_steps as f64;
        if self.kind == Scheduler::Constant {
            return 1.0;
        }
        if step < warmup {
            return k / w.max(1.0);
        }
        let progress = (k - w) / (t - w).max(1.0);
        let pi = std::f64::consts::PI;
        match self.kind {
            Scheduler::Constant | Scheduler::ConstantWithWarmup => 1.0,
            // Signed arithmetic: T - k is negative past the end of training.
            Scheduler::Linear => (0.0f64).max((t - k) / (t - w).max(1.0)),
            Scheduler::Cosine | Scheduler::CosineWithMinLr => {
                let f = 0.5 * (1.0 + (pi * self.num_cycles * 2.0 * progress).cos());
                (0.0f64).max(f * (1.0 - self.min_lr_rate) + self.min_lr_rate)
            }
            Scheduler::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let phase = (self.num_cycles * progress) % 1.0;
                    (0.0f64).max(0.5 * (1.0 + (pi * phase).cos()))
                }
            }
            Scheduler::Polynomial => {
                let end = self.lr_end_rate;
                if step > total_steps {
                    end
                } else {
                    // transformers divides by T - W unclamped; at T = W (only ever evaluated
                    // past the last step) its value is the end rate.
                    let remaining = if total_steps > warmup {
                        1.0 - (k - w) / (t - w)
                    } else {
                        0.0
                    };
                    (1.0 - end) * remaining.powf(self.power) + end
                }
            }
            Scheduler::InverseSqrt => {
                let timescale = if warmup > 0 { w } else { 10_000.0 };
                let shift = timescale - w;
                1.0 / ((k + shift) / timescale).sqrt()
            }
        }
    }
}

/// `num_warmup_steps` for a run of `total_steps`: `warmup_steps` when set, else
/// `ceil(total_steps * warmup_ratio)`, as transformers' `TrainingArguments.get_warmup_steps`.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total_steps as f64 * warmup_ratio).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The multiplier of the base rate at `step` for a schedule with default arguments.
    fn lr_factor(kind: Scheduler, step: usize, warmup: usize, total_steps: usize) -> f64 {
        Schedule::new(kind).factor(step, warmup, total_steps)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn constant_ignores_warmup() {
        for k in 0..5 {
            close(lr_factor(Scheduler::Constant, k, 3, 10), 1.0);
        }
    }

    #[test]
    fn warmup_of_one_zeroes_first_step() {
        for kind in [
            Scheduler::ConstantWithWarmup,
            Scheduler::Linear,
            Scheduler::Cosine,
            Scheduler::InverseSqrt,
        ] {
            close(lr_factor(kind, 0, 1, 10), 0.0);
        }
        // After the single warmup step: full rate for linear (T - 1)/(T - 1).
        close(lr_factor(Scheduler::Linear, 1, 1, 10), 1.0);
        close(lr_factor(Scheduler::Cosine, 1, 1, 10), 1.0);
        close(lr_factor(Scheduler::InverseSqrt, 1, 1, 10), 1.0);
        close(lr_factor(Scheduler::ConstantWithWarmup, 1, 1, 10), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up_and_yields_to_steps() {
        assert_eq!(warmup_steps(0, 0.0, 100), 0);
        assert_eq!(warmup_steps(0, 0.1, 100), 10);
        assert_eq!(warmup_steps(0, 0.15, 10), 2);
        // 100 * 0.07 is 7.000000000000001 in f64, so transformers warms up for 8 steps.
        assert_eq!(warmup_steps(0, 0.07, 100), 8);
        assert_eq!(warmup_steps(0, 0.01, 7), 1);
        assert_eq!(warmup_steps(0, 1.0, 7), 7);
        assert_eq!(warmup_steps(3, 0.5, 100), 3);
    }

    #[test]
    fn constant_with_warmup() {
        close(lr_factor(Scheduler::ConstantWithWarmup, 0, 4, 10), 0.0);
        close(lr_factor(Scheduler::ConstantWithWarmup, 1, 4, 10), 0.25);
        close(lr_factor(Scheduler::ConstantWithWarmup, 3, 4, 10), 0.75);
        close(lr_factor(Scheduler::ConstantWithWarmup, 4, 4, 10), 1.0);
        close(lr_factor(Scheduler::ConstantWithWarmup, 0, 0, 10), 1.0);
    }

    #[test]
    fn linear() {
        // No warmup, T = 4: 1, 0.75, 0.5, 0.25, then 0.
        let f: Vec<f64> = (0..6)
            .map(|k| lr_factor(Scheduler::Linear, k, 0, 4))
            .collect();
        for (a, b) in f.iter().zip([1.0, 0.75, 0.5, 0.25, 0.0, 0.0]) {
            close(*a, b);
        }
        // W = 2, T = 6: 0, 0.5, then (6-k)/4.
        close(lr_factor(Scheduler::Linear, 0, 2, 6), 0.0);
        close(lr_factor(Scheduler::Linear, 1, 2, 6), 0.5);
        close(lr_factor(Scheduler::Linear, 2, 2, 6), 1.0);
        close(lr_factor(Scheduler::Linear, 3, 2, 6), 0.75);
        close(lr_factor(Scheduler::Linear, 5, 2, 6), 0.25);
        // T <= W: denominator clamps to 1, factor clamps to 0.
        close(lr_factor(Scheduler::Linear, 3, 3, 3), 0.0);
        close(lr_factor(Scheduler::Linear, 0, 0, 0), 0.0);
        close(lr_factor(Scheduler::Linear, 0, 0, 1), 1.0);
    }

    #[test]
    fn cosine() {
        // No warmup, T = 4: progress k/4 -> 0.5 * (1 + cos(pi * k / 4)).
        close(lr_factor(Scheduler::Cosine, 0, 0, 4), 1.0);
        close(
            lr_factor(Scheduler::Cosine, 1, 0, 4),
            0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
        );
        close(lr_factor(Scheduler::Cosine, 2, 0, 4), 0.5);
        close(
            lr_factor(Scheduler::Cosine, 3, 0, 4),
            0.5 * (1.0 - std::f64::consts::FRAC_1_SQRT_2),
        );
        close(lr_factor(Scheduler::Cosine, 4, 0, 4), 0.0);
        // W = 2, T = 4: 0, 0.5, then progress (k-2)/2.
        close(lr_factor(Scheduler::Cosine, 0, 2, 4), 0.0);
        close(lr_factor(Scheduler::Cosine, 1, 2, 4), 0.5);
        close(lr_factor(Scheduler::Cosine, 2, 2, 4), 1.0);
        close(lr_factor(Scheduler::Cosine, 3, 2, 4), 0.5);
        // Past the end the half-cosine rises again, as in transformers (max(0, ...) only).
        close(lr_factor(Scheduler::Cosine, 6, 0, 4), 0.5);
    }

    #[test]
    fn inverse_sqrt() {
        // W = 4: warmup k/4, then sqrt(4 / k).
        close(lr_factor(Scheduler::InverseSqrt, 2, 4, 0), 0.5);
        close(lr_factor(Scheduler::InverseSqrt, 4, 4, 0), 1.0);
        close(lr_factor(Scheduler::InverseSqrt, 16, 4, 0), 0.5);
        close(lr_factor(Scheduler::InverseSqrt, 9, 4, 0), 2.0 / 3.0);
        // W = 0: timescale 10000, shift 10000 -> 1 / sqrt((k + 10000) / 10000).
        close(lr_factor(Scheduler::InverseSqrt, 0, 0, 0), 1.0);
        close(lr_factor(Scheduler::InverseSqrt, 30_000, 0, 0), 0.5);
        close(
            lr_factor(Scheduler::InverseSqrt, 1, 0, 0),
            1.0 / (1.0001f64).sqrt(),
        );
    }

    #[test]
    fn schedules_with_arguments_match_transformers() {
        // transformers 5.25 `get_scheduler(name, SGD(lr), W, T, scheduler_specific_kwargs)`:
        // the optimizer's rate before each of steps 0..=T.
        // (num_cycles, min_lr_rate, min_lr, lr_end, power)
        type Args = [Option<f64>; 5];
        type Case = (Scheduler, f64, usize, usize, Args, &'static [f64]);
        #[rustfmt::skip]
        let cases: [Case; 7] = [
            (
                Scheduler::CosineWithMinLr, 1e-3, 2, 10, [None, Some(0.1), None, None, None],
                &[0.0, 0.0005, 0.001, 0.000965745789630079, 0.0008681980515339464,
                  0.0007222075445642904, 0.00055, 0.0003777924554357096, 0.00023180194846605365,
                  0.00013425421036992097, 0.0001],
            ),
            (
                Scheduler::CosineWithMinLr, 1e-5, 0, 7, [None, None, Some(1e-6), None, None],
                &[1e-05, 9.554359905560887e-06, 8.305704108364301e-06, 6.501344202803415e-06,
                  4.498655797196586e-06, 2.6942958916356993e-06, 1.4456400944391143e-06, 1e-06],
            ),
            (
                Scheduler::CosineWithRestarts, 1e-3, 1, 9, [Some(3.0), None, None, None, None],
                &[0.0, 0.001, 0.000691341716182545, 0.00014644660940672628,
                  0.0009619397662556434, 0.0005, 3.806023374435663e-05, 0.0008535533905932737,
                  0.0003086582838174551, 0.0],
            ),
            (
                Scheduler::CosineWithRestarts, 1e-3, 0, 5, [None, None, None, None, None],
                &[0.001, 0.0009045084971874737, 0.0006545084971874737, 0.00034549150281252633,
                  9.549150281252633e-05, 0.0],
            ),
            (
                Scheduler::Polynomial, 1e-3, 2, 8, [None, None, None, Some(1e-4), Some(2.0)],
                &[0.0, 0.0005, 0.001, 0.0007250000000000001, 0.0005000000000000001, 0.000325,
                  0.00020000000000000004, 0.000125, 0.0001],
            ),
            (
                Scheduler::Polynomial, 1e-5, 0, 5, [None, None, None, None, None],
                &[1e-05, 8.020000000000001e-06, 6.040000000000001e-06, 4.06e-06,
                  2.0799999999999996e-06, 1e-07],
            ),
            (
                Scheduler::Cosine, 1e-3, 1, 6, [Some(1.5), None, None, None, None],
                &[0.0, 0.001, 0.00034549150281252633, 9.549150281252622e-05,
                  0.0009045084971874737, 0.0006545084971874739, 0.0],
            ),
        ];
        for (kind, lr, w, t, [num_cycles, min_lr_rate, min_lr, lr_end, power], want) in cases {
            let o = OptimConfig {
                lr,
                scheduler: kind,
                num_cycles,
                min_lr_rate,
                min_lr,
                lr_end,
                power,
                ..OptimConfig::default()
            };
            let s = Schedule::from_config(&o);
            for (k, &w_lr) in want.iter().enumerate() {
                let got = lr * s.factor(k, w, t);
                assert!(
                    (got - w_lr).abs() <= 1e-12 * w_lr.abs().max(1e-30),
                    "{kind} W {w} T {t} step {k}: {got} vs {w_lr}"
                );
            }
        }
    }
}

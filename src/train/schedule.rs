//! Learning-rate schedules, exactly as `transformers.optimization` computes them.
//!
//! The learning rate of optimizer step `k` (counting from 0) is `lr * lr_factor(kind, k, W, T)`,
//! which is what `torch.optim.lr_scheduler.LambdaLR` applies: the lambda is evaluated at step 0
//! when the scheduler is built, and again after every `scheduler.step()`.

use crate::config::Scheduler;

/// Multiplier of the base learning rate for optimizer step `step` (from 0).
///
/// `warmup` is `num_warmup_steps`, `total_steps` is `num_training_steps` (only the linear and
/// cosine schedules use it). The formulas are those of transformers' `get_scheduler`:
///
/// - `constant`: always 1.0; `get_scheduler("constant", ...)` ignores the warmup.
/// - `constant_with_warmup`: `k < W ? k / max(1, W) : 1`.
/// - `linear`: `k < W ? k / max(1, W) : max(0, (T - k) / max(1, T - W))`.
/// - `cosine` (`num_cycles = 0.5`): `k < W ? k / max(1, W) :
///   max(0, 0.5 * (1 + cos(pi * 2 * 0.5 * progress)))`, `progress = (k - W) / max(1, T - W)`.
/// - `inverse_sqrt`: `k < W ? k / max(1, W) : 1 / sqrt((k + shift) / timescale)` with
///   `timescale = W` (or 10000 when `W = 0`) and `shift = timescale - W`.
pub fn lr_factor(kind: Scheduler, step: usize, warmup: usize, total_steps: usize) -> f64 {
    let k = step as f64;
    let w = warmup as f64;
    let t = total_steps as f64;
    let warming = step < warmup;
    let warm = || k / w.max(1.0);
    match kind {
        Scheduler::Constant => 1.0,
        Scheduler::ConstantWithWarmup => {
            if warming {
                warm()
            } else {
                1.0
            }
        }
        Scheduler::Linear => {
            if warming {
                warm()
            } else {
                // Signed arithmetic: T - k is negative past the end of training.
                (0.0f64).max((t - k) / (t - w).max(1.0))
            }
        }
        Scheduler::Cosine => {
            if warming {
                warm()
            } else {
                let num_cycles = 0.5;
                let progress = (k - w) / (t - w).max(1.0);
                (0.0f64)
                    .max(0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()))
            }
        }
        Scheduler::InverseSqrt => {
            if warming {
                warm()
            } else {
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
}

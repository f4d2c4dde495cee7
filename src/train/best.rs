//! The best evaluation of a run and early stopping, as transformers decides them
//! (`Trainer._determine_best_metric`, `EarlyStoppingCallback`).
//!
//! Both are pure functions of the evaluation history, so a resumed run decides as the
//! uninterrupted one. An evaluation at step 0 (`train.eval_on_start`) is no candidate:
//! transformers runs it outside the loop that determines the best.

use super::log::EvalEntry;

/// The evaluation `load_best_model_at_end` picks: each one strictly better than all before it
/// replaces the best, as transformers compares (`np.greater` or `np.less`; NaN never wins).
pub fn best_eval<'a>(evals: &'a [EvalEntry], key: &str, greater: bool) -> Option<&'a EvalEntry> {
    let mut best: Option<(&EvalEntry, f64)> = None;
    for e in evals.iter().filter(|e| e.step > 0) {
        let Some(v) = e.metrics.value(key).filter(|v| !v.is_nan()) else {
            continue;
        };
        if best.is_none_or(|(_, b)| improves(v, b, greater)) {
            best = Some((e, v));
        }
    }
    best.map(|(e, _)| e)
}

/// `EarlyStoppingCallback`'s patience counter after `evals`: each evaluation that does not
/// beat the best before it by more than `threshold` adds one, one that does resets it. The
/// best is transformers' `state.best_metric`: unset before the first evaluation in the loop
/// (that one always resets), then the strict best so far, or ±infinity while every value was
/// NaN (which never beats it).
pub fn patience_counter(evals: &[EvalEntry], key: &str, greater: bool, threshold: f64) -> usize {
    let mut best: Option<f64> = None;
    let mut counter = 0;
    for e in evals {
        if e.step == 0 {
            counter = 0;
            continue;
        }
        let v = e.metrics.value(key).unwrap_or(f64::NAN);
        counter = match best {
            Some(b) if !(improves(v, b, greater) && (v - b).abs() > threshold) => counter + 1,
            _ => 0,
        };
        let worst = if greater {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        let b = best.get_or_insert(worst);
        if improves(v, *b, greater) {
            *b = v;
        }
    }
    counter
}

/// The checkpoint whose weights a `load_best_model_at_end` run ends with, as transformers'
/// `_load_best_model` picks it: none when the best evaluation is the last step's of a run that
/// trained all `total` steps (the final weights are it), else the best checkpoint written, if
/// any (an evaluation between checkpoints never is one, nor the step where early stopping
/// ended a run unless a checkpoint was due there).
pub fn checkpoint_to_load(
    best: Option<&EvalEntry>,
    best_checkpoint: Option<usize>,
    end: usize,
    total: usize,
) -> Option<usize> {
    match best? {
        b if b.step == end && end == total => None,
        _ => best_checkpoint,
    }
}

fn improves(v: f64, best: f64, greater: bool) -> bool {
    if greater {
        v > best
    } else {
        v < best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::EvalMetrics;
    use crate::train::loss::Metrics;

    fn eval(step: usize, loss: f64) -> EvalEntry {
        EvalEntry {
            step,
            epoch: 0.0,
            metrics: EvalMetrics {
                pairs: 4,
                loss,
                metrics: Metrics::default(),
                batches: 1,
                runtime_s: 1.0,
            },
        }
    }

    /// Each evaluation strictly better than all before it becomes the best; a tie keeps the
    /// earlier one; NaN and step 0 never count.
    #[test]
    fn the_best_evaluation_is_the_first_strictly_better() {
        let evals = [eval(2, 0.5), eval(4, 0.3), eval(6, 0.3), eval(8, 0.4)];
        let step =
            |evals: &[EvalEntry], greater| best_eval(evals, "eval_loss", greater).map(|e| e.step);
        assert_eq!(step(&evals, false), Some(4));
        assert_eq!(step(&evals, true), Some(2));
        assert_eq!(step(&[], false), None);
        let odd = [eval(0, 0.1), eval(2, f64::NAN), eval(4, 0.6), eval(6, 0.7)];
        assert_eq!(step(&odd, false), Some(4));
        assert_eq!(step(&odd, true), Some(6));
        assert_eq!(step(&odd[..2], false), None);
    }

    /// transformers' counter on a lower-is-better metric, step by step.
    #[test]
    fn the_patience_counter_follows_early_stopping_callback() {
        let counts = |losses: &[(usize, f64)], threshold: f64| -> Vec<usize> {
            let evals: Vec<_> = losses.iter().map(|&(s, l)| eval(s, l)).collect();
            (1..=evals.len())
                .map(|n| patience_counter(&evals[..n], "eval_loss", false, threshold))
                .collect()
        };
        let run = [(2, 0.5), (4, 0.4), (6, 0.45), (8, 0.41), (10, 0.2)];
        assert_eq!(counts(&run, 0.0), [0, 0, 1, 2, 0]);
        // An improvement of 0.1 is none above 0.15, though the best moves to it (0.41 does
        // not beat 0.4); 0.2 beats 0.4 by more.
        assert_eq!(counts(&run, 0.15), [0, 1, 2, 3, 0]);
        // A step-0 evaluation resets and is not the best the next one must beat.
        assert_eq!(counts(&[(0, 0.1), (2, 0.5), (4, 0.6)], 0.0), [0, 0, 1]);
        // NaN: never an improvement, yet the first evaluation in the loop resets; a NaN
        // best stays infinite, which any number beats by more than the threshold.
        let nan = f64::NAN;
        assert_eq!(counts(&[(2, nan), (4, nan), (6, 0.5)], 1.0), [0, 1, 0]);
        // Higher is better: the same rule mirrored.
        let evals = [eval(2, 0.5), eval(4, 0.6), eval(6, 0.55)];
        assert_eq!(patience_counter(&evals, "eval_loss", true, 0.0), 1);
        assert_eq!(patience_counter(&evals, "eval_loss", true, 0.2), 2);
    }
}

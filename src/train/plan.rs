//! Which pairs each optimizer step trains on, exactly as transformers' Trainer cuts an epoch:
//! micro-batches of `batch_size` in (shuffled) order, the last one possibly smaller (or dropped,
//! with `dataloader_drop_last`); each step
//! takes `grad_accum` of them except the epoch's last step, which takes what remains; with
//! `max_steps` beyond one epoch the data wraps into the next epoch with a fresh order.

use super::randperm::torch_randperm;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How a shuffled epoch is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShuffleOrder {
    /// transformers' Trainer: `torch.randperm` on a generator seeded with `seed + epoch`.
    Torch,
    /// orpo's order before it followed torch's, kept so that runs checkpointed then resume
    /// over the same pairs.
    ChaCha8,
}

impl ShuffleOrder {
    pub fn name(self) -> &'static str {
        match self {
            ShuffleOrder::Torch => "torch",
            ShuffleOrder::ChaCha8 => "chacha8",
        }
    }
}

/// How an epoch is cut into steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// transformers' `dataloader_drop_last`: a short last micro-batch is left out.
    pub drop_last: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub n_pairs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub drop_last: bool,
    pub shuffle: bool,
    pub order: ShuffleOrder,
    pub seed: u64,
    pub micro_per_epoch: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

/// The micro-batches of one optimizer step, as pair indices, and where the step leaves the
/// epoch counter.
#[derive(Debug, Clone, PartialEq)]
pub struct StepBatches {
    pub epoch: usize,
    pub micro_batches: Vec<Vec<usize>>,
    /// transformers' fractional epoch after this step.
    pub epoch_progress: f64,
    /// When this step holds the epoch's last micro-batch and the epoch does not divide into
    /// full micro-batches: TRL reports per-pair metrics of only this many leading pairs of
    /// each of the step's micro-batches (see `Metrics::restrict_pair_metrics`).
    pub metric_pairs: Option<usize>,
}

impl Plan {
    pub fn new(
        n_pairs: usize,
        batching: Batching,
        epochs: f64,
        max_steps: usize,
        shuffle: bool,
        seed: u64,
    ) -> Self {
        let Batching {
            batch_size,
            grad_accum,
            drop_last,
        } = batching;
        let micro_per_epoch = match drop_last {
            true => n_pairs / batch_size,
            false => n_pairs.div_ceil(batch_size),
        };
        let steps_per_epoch = micro_per_epoch.div_ceil(grad_accum);
        let total_steps = if max_steps > 0 {
            max_steps
        } else {
            // transformers: `ceil(num_train_epochs * steps_per_epoch)`.
            (epochs * steps_per_epoch as f64).ceil() as usize
        };
        Plan {
            n_pairs,
            batch_size,
            grad_accum,
            drop_last,
            shuffle,
            order: ShuffleOrder::Torch,
            seed,
            micro_per_epoch,
            steps_per_epoch,
            total_steps,
        }
    }

    /// The order of the pairs in `epoch`: file order, or a permutation seeded by (seed, epoch)
    /// so that any step can be recomputed without replaying earlier ones (exact resume).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        if !self.shuffle {
            return (0..self.n_pairs).collect();
        }
        match self.order {
            ShuffleOrder::Torch => {
                torch_randperm(self.n_pairs, self.seed.wrapping_add(epoch as u64))
            }
            ShuffleOrder::ChaCha8 => {
                let mut order: Vec<usize> = (0..self.n_pairs).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(
                    self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                order.shuffle(&mut rng);
                order
            }
        }
    }

    /// The pairs of optimizer step `step` (from 0).
    pub fn step(&self, step: usize) -> StepBatches {
        let epoch = step / self.steps_per_epoch;
        let in_epoch = step % self.steps_per_epoch;
        let order = self.order(epoch);
        let first = in_epoch * self.grad_accum;
        let last = ((in_epoch + 1) * self.grad_accum).min(self.micro_per_epoch);
        let micro_batches = (first..last)
            .map(|mb| {
                let lo = mb * self.batch_size;
                let hi = ((mb + 1) * self.batch_size).min(self.n_pairs);
                order[lo..hi].to_vec()
            })
            .collect();
        let remainder = match self.drop_last {
            true => 0,
            false => self.n_pairs % self.batch_size,
        };
        let metric_pairs = (last == self.micro_per_epoch && remainder > 0).then_some(remainder);
        StepBatches {
            epoch,
            micro_batches,
            epoch_progress: epoch as f64 + last as f64 / self.micro_per_epoch as f64,
            metric_pairs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(batch_size: usize, grad_accum: usize) -> Batching {
        Batching {
            batch_size,
            grad_accum,
            drop_last: false,
        }
    }

    #[test]
    fn a_short_last_micro_batch_is_dropped_with_drop_last() {
        // 7 pairs, batch 2 -> 3 full micro-batches (pair 6 of each epoch's order left out);
        // grad_accum 2 -> steps of 2 and 1, every pair's metrics reported.
        let batching = Batching {
            drop_last: true,
            ..cut(2, 2)
        };
        let p = Plan::new(7, batching, 2.0, 0, false, 0);
        assert_eq!(
            (p.micro_per_epoch, p.steps_per_epoch, p.total_steps),
            (3, 2, 4)
        );
        assert_eq!(p.step(0).micro_batches, vec![vec![0, 1], vec![2, 3]]);
        let last = p.step(1);
        assert_eq!(last.micro_batches, vec![vec![4, 5]]);
        assert_eq!((last.epoch_progress, last.metric_pairs), (1.0, None));
        assert_eq!(p.step(2).micro_batches, vec![vec![0, 1], vec![2, 3]]);
        // Shuffled: the epoch's permutation of all 7, its first 6 trained.
        let p = Plan::new(7, batching, 1.0, 0, true, 42);
        let trained: Vec<usize> = (0..2)
            .flat_map(|s| p.step(s).micro_batches.concat())
            .collect();
        assert_eq!(trained, p.order(0)[..6]);
    }

    #[test]
    fn partial_last_step_and_wraparound() {
        // 7 pairs, batch 2 -> 4 micro-batches (last has 1); grad_accum 3 -> steps of 3 and 1.
        let p = Plan::new(7, cut(2, 3), 1.0, 5, false, 0);
        assert_eq!(p.steps_per_epoch, 2);
        assert_eq!(
            p.step(0).micro_batches,
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
        assert_eq!(p.step(1).micro_batches, vec![vec![6]]);
        assert_eq!(p.step(1).epoch_progress, 1.0);
        assert_eq!(
            p.step(2).micro_batches,
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
        assert_eq!(p.step(2).epoch, 1);
        assert!((p.step(2).epoch_progress - 1.75).abs() < 1e-12);
    }

    #[test]
    fn shuffled_epochs_are_transformers_order() {
        // TRL 1.16's ORPOTrainer, seed 42, 10 pairs, batch 2, 3 epochs: the pairs its
        // training_step received, in order.
        let p = Plan::new(10, cut(2, 1), 3.0, 0, true, 42);
        let trained: Vec<usize> = (0..p.total_steps)
            .flat_map(|s| p.step(s).micro_batches.concat())
            .collect();
        let trl = [
            2, 6, 1, 8, 4, 5, 0, 9, 3, 7, 8, 4, 9, 0, 5, 1, 6, 7, 2, 3, 2, 6, 3, 8, 7, 9, 1, 4, 5,
            0,
        ];
        assert_eq!(trained, trl);
    }

    #[test]
    fn a_fraction_of_an_epoch_rounds_up_to_whole_steps() {
        // 10 pairs, batch 2, grad_accum 2 -> 3 steps an epoch; transformers:
        // max_steps = ceil(num_train_epochs * 3).
        for (epochs, steps) in [(1.0, 3), (2.5, 8), (0.1, 1), (1.34, 5), (2.0, 6)] {
            assert_eq!(
                Plan::new(10, cut(2, 2), epochs, 0, false, 0).total_steps,
                steps
            );
        }
        // max_steps still overrides.
        assert_eq!(Plan::new(10, cut(2, 2), 2.5, 4, false, 0).total_steps, 4);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        for order in [ShuffleOrder::Torch, ShuffleOrder::ChaCha8] {
            let mut p = Plan::new(10, cut(2, 1), 2.0, 0, true, 42);
            p.order = order;
            let mut a = p.order(0);
            assert_eq!(a, p.order(0));
            assert_ne!(a, p.order(1));
            a.sort();
            assert_eq!(a, (0..10).collect::<Vec<_>>());
        }
    }
}

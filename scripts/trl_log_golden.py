#!/usr/bin/env python3
"""Record TRL ORPOTrainer's training log and in-training evaluations (tests/golden_log_eval.rs).

What `orpo train` writes to metrics.jsonl with `train.log_every > 1` and to eval_metrics.jsonl
with `train.eval_every`, pinned to what TRL logs: logging_steps windows (loss averaged over the
window's steps, TRL's stored metrics over its micro-batches, grad_norm and learning_rate the last
step's), eval_strategy="steps" plus transformers' evaluation at the last step, and a warmup given
as a ratio (transformers 5: a float `warmup_steps` below 1; orpo's `optim.warmup_ratio`).
Model, pairs in file order and dropout handling are those of the shared tools/trl_golden.py,
imported from ../shared/tools beside this checkout (or from TRL_GOLDEN_DIR). With shuffle=1 the
pairs come in the Trainer's own shuffled order for `seed` (orpo's `train.shuffle`, `train.seed`).

With epochs=E > 0 the run is `num_train_epochs=E` (may be fractional) with max_steps left at -1:
transformers takes ceil(E * steps per epoch) optimizer steps, an epoch being
ceil(micro-batches / grad_accum) steps (the last one possibly short), and `steps` is unused.
eval_strategy ("steps" or "epoch") and save_strategy ("no", "steps", "epoch" or "best", saving each
save_steps steps with "steps"; save_steps unset = eval_steps) are the Trainer's own. The output then
also records the Trainer's `state.max_steps` as "max_steps" and the steps of the checkpoint-N
folders it wrote as "checkpoints" (sorted), and its settings leave out the ones that run did not use
(steps with epochs > 0, eval_steps with neither strategy "steps" (or save_steps set), save_steps
without save_strategy "steps"). At the defaults (epochs=0 eval_strategy=steps save_strategy=no,
save_steps unset) none of these keys is written: the output is the same as before these settings.

logging_steps, eval_steps and save_steps take an integer or, as transformers does, a float, passed
to ORPOConfig unchanged (TrainingArguments refuses a non-integer above 1; 1.0 is one step). A value
below 1 is a fraction of the run's optimizer steps: TrainerState.compute_steps makes it
math.ceil(max_steps * x). When any of them is below 1 the output also has "max_steps",
"checkpoints" and "resolved_steps": the Trainer's `state.logging_steps`, `eval_steps`,
`save_steps` after training, as {"logging", "eval", "save"}.

load_best=1 is the Trainer's `load_best_model_at_end=True`, with metric= its `metric_for_best_model`
(unset: transformers' "loss"; "eval_" is prefixed when missing), greater_is_better= (empty/unset:
transformers' default, True unless the metric's name ends in "loss"; 0 or 1) and save_total_limit=N
(0: unset). The output then also has "best": the Trainer's resolved metric_for_best_model and
greater_is_better, its final `state.best_metric`, `best_global_step` and `best_model_checkpoint`
(as the "checkpoint-N" basename), "loaded_checkpoint" (the checkpoint `_load_best_model` read at the
end of train(), null when it was not called), "final_weights_saved_at" (the steps whose checkpoint
save saw exactly the parameter norms train() ended with) and "checkpoint_states" (global_step and
the best_* fields of each checkpoint-N/trainer_state.json left after training); plus, after train(),
"final_param_norms" (the model as train() left it) and "eval_after_training" (trainer.evaluate()
on it). "checkpoints" lists the folders left after training (rotation by save_total_limit, and with
save_total_limit=1 the Trainer's deletion at the end of every checkpoint but the best).

patience=N > 0 adds transformers' EarlyStoppingCallback(early_stopping_patience=N,
early_stopping_threshold=threshold) (threshold=X, default 0.0: an evaluation counts as an improvement
only when it beats state.best_metric by more than X; best_metric still moves to any better value).
The output then also has "early_stopping": patience, threshold, the callback's
early_stopping_patience_counter right after train() (before the trainer.evaluate() below, which would
count once more), "stopped_at" (state.global_step after train()) and "max_steps". With patience > 0
and metric set, "best" and what comes with it are recorded even with load_best=0 (metric-only
tracking: loaded_checkpoint is then null). eval_on_start=1 and logging_first_step=1 are the
ORPOConfig fields of those names: an evaluation before the first step (logged with step 0, epoch 0;
it is not passed to _determine_best_metric, so it never becomes the best) and a training log line
at step 1 (the next window then starts after step 1). drop_last=1 is `dataloader_drop_last=True`:
each epoch's last micro-batch, when short, is dropped, and so is the evaluation's. eval_delay=X is
the ORPOConfig field: no evaluation before step X (epoch X under eval_strategy="epoch").

Needs: torch, transformers, trl, datasets (pip). Run from the repository root:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.log-eval.trl.json [key=value ...]
Settings (defaults): model=tests/fixtures/tiny-opt train=examples/data/hh-rlhf-64.jsonl
eval=examples/data/hh-rlhf-eval-16.jsonl steps=15 batch=6 grad_accum=3 lr=1e-3 beta=0.1
max_length=512 weight_decay=0.05 max_grad_norm=1.0 scheduler=linear warmup_ratio=0.1
logging_steps=3 eval_steps=4 shuffle=0 seed=0 epochs=0 eval_strategy=steps save_strategy=no
save_steps= (unset: eval_steps) load_best=0 metric= greater_is_better= save_total_limit=0 patience=0
threshold=0.0 eval_on_start=0 logging_first_step=0

tests/fixtures/golden/extra/tiny-opt.epochs.trl.json (2.5 epochs of 4 steps, the 4th of each
epoch over 2 micro-batches: 10 steps, evaluations and checkpoints at each epoch's end) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.epochs.trl.json \
    epochs=2.5 eval_strategy=epoch save_strategy=epoch logging_steps=1 batch=6 grad_accum=3

tests/fixtures/golden/extra/tiny-opt.fractions.trl.json (the same 10 steps; logging every
ceil(2.5) = 3 steps, evaluating every ceil(4.5) = 5, saving every ceil(7.0) = 7, plus the
Trainer's evaluation and save at the last step) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.fractions.trl.json \
    epochs=2.5 logging_steps=0.25 eval_steps=0.45 save_steps=0.7 save_strategy=steps batch=6 grad_accum=3

tests/fixtures/golden/extra/tiny-opt.best.trl.json (20 steps at lr 1e-2, evaluations and checkpoints
every 4 steps, eval_rewards/margins best at step 8 of 4, 8, 12, 16, 20, at most 1 checkpoint kept
besides the best) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.best.trl.json \
    steps=20 lr=1e-2 eval_steps=4 save_steps=4 save_strategy=steps load_best=1 metric=rewards/margins \
    save_total_limit=1

tests/fixtures/golden/extra/tiny-opt.best-unsaved.trl.json (the same run, evaluating every 3 steps and
saving every 6: the best evaluation, step 9, has no checkpoint, and the Trainer loads checkpoint-6) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.best-unsaved.trl.json \
    steps=20 lr=1e-2 eval_steps=3 save_steps=6 save_strategy=steps load_best=1 metric=rewards/margins

tests/fixtures/golden/extra/tiny-opt.best-unsaved-first.trl.json (lr 2e-2, evaluating every 5 steps
and saving every 10: the best evaluation is the first, step 5, with no checkpoint, so no
best_model_checkpoint is ever set and train() ends with the last step's weights) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.best-unsaved-first.trl.json \
    steps=20 lr=2e-2 eval_steps=5 save_steps=10 save_strategy=steps load_best=1 metric=rewards/margins

tests/fixtures/golden/extra/tiny-opt.early-stop.trl.json (the tiny-opt.best run without save_total_limit,
stopped early with patience 2: eval_rewards/margins is best at step 8, steps 12 and 16 do not improve
it, training stops at step 16 of 20 and the Trainer loads checkpoint-8) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.early-stop.trl.json \
    steps=20 lr=1e-2 eval_steps=4 save_steps=4 save_strategy=steps load_best=1 metric=rewards/margins \
    patience=2

tests/fixtures/golden/extra/tiny-opt.early-stop-threshold.trl.json (metric-only, eval_loss every 3 steps
of 30 at lr 5e-3, improvements 0.525, 0.268, 0.137, 0.075 against a threshold of 0.2: the counter goes
0, 0, 1 (step 12), 2 (step 15) while best_metric moves every time, and training stops at step 15 of 30;
no best model is loaded, the final weights are step 15's, and with a limit of 1 only checkpoint-15, the
best, remains. At lr 1e-2 the same run's grad_norm moves by percents between f32 implementations by
step 15, too chaotic to hold to TRL) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.early-stop-threshold.trl.json \
    steps=30 lr=5e-3 eval_steps=3 save_steps=3 save_strategy=steps metric=loss patience=2 threshold=0.2 \
    save_total_limit=1

tests/fixtures/golden/extra/tiny-opt.early-stop-best-unsaved.trl.json (the same run saving every 6 steps
with load_best=1: the evaluation that stops it, step 15, is the best but has no checkpoint, so the
Trainer loads checkpoint-12, the best written, and keeps only it) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.early-stop-best-unsaved.trl.json \
    steps=30 lr=5e-3 eval_steps=3 save_steps=6 save_strategy=steps load_best=1 metric=loss patience=2 \
    threshold=0.2 save_total_limit=1

tests/fixtures/golden/extra/tiny-opt.save-best.trl.json (the tiny-opt.best run with save_strategy="best":
checkpoints only at evaluations that beat every one before (steps 4 and 8), the limit of 1 leaving
checkpoint-8, which is loaded) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.save-best.trl.json \
    steps=20 lr=1e-2 eval_steps=4 save_strategy=best load_best=1 metric=rewards/margins save_total_limit=1

tests/fixtures/golden/extra/tiny-opt.first-step.trl.json (the default 15 steps with an evaluation at step 0
and a log line at step 1; with greater_is_better=1 on the falling eval_loss the step-0 evaluation would
be the best if it counted, but the best is the first in-training one, step 4, and checkpoint-4 is loaded) is:
  python3 scripts/trl_log_golden.py tests/fixtures/golden/extra/tiny-opt.first-step.trl.json \
    eval_on_start=1 logging_first_step=1 load_best=1 metric=loss greater_is_better=1 save_steps=4 \
    save_strategy=steps
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, TrainerCallback
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

sys.path.insert(0, os.environ.get("TRL_GOLDEN_DIR", str(Path(__file__).resolve().parents[2] / "shared/tools")))
from trl_golden import SequentialORPOTrainer, disable_all_dropout  # noqa: E402

DEFAULTS = dict(model="tests/fixtures/tiny-opt", train="examples/data/hh-rlhf-64.jsonl",
                eval="examples/data/hh-rlhf-eval-16.jsonl", steps=15, batch=6, grad_accum=3,
                lr=1e-3, beta=0.1, max_length=512, weight_decay=0.05, max_grad_norm=1.0,
                scheduler="linear", warmup_ratio=0.1, logging_steps=3, eval_steps=4, shuffle=0, seed=0)
# Settings added after the goldens above: written to the output only away from these defaults.
LATER = dict(epochs=0.0, eval_strategy="steps", save_strategy="no", save_steps=None,
             load_best=0, metric=None, greater_is_better=None, save_total_limit=0,
             patience=0, threshold=0.0, eval_on_start=0, logging_first_step=0, drop_last=0,
             eval_delay=0.0)
DEFAULTS.update(LATER)
STEP_KEYS = ("logging_steps", "eval_steps", "save_steps")


def parse(k, v):
    if k in STEP_KEYS:  # an integer, or a float as given (a fraction of the run below 1)
        return int(v) if v.lstrip("+-").isdigit() else float(v)
    if k == "metric":  # metric_for_best_model, with or without the "eval_" prefix; empty = unset
        return v or None
    if k == "greater_is_better":  # empty = unset (transformers' default from the metric's name)
        return None if v == "" else bool(int(v))
    return type(DEFAULTS[k])(v)


def norms(model):
    return {n: float(p.detach().norm()) for n, p in model.named_parameters()}


def name(path):  # a checkpoint path as its "checkpoint-N" basename
    return None if path is None else Path(path).name


class SavedNorms(TrainerCallback):
    """The model's parameter norms at each checkpoint save, to tell which weights train() ends with."""

    def __init__(self):
        self.by_step = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = norms(model)


def main():
    out_path = sys.argv[1]
    s = dict(DEFAULTS)
    for kv in sys.argv[2:]:
        k, v = kv.split("=", 1)
        s[k] = parse(k, v)
    torch.manual_seed(s["seed"])
    load = lambda p: datasets.Dataset.from_list([json.loads(l) for l in open(p) if l.strip()])

    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    disable_all_dropout(model)

    assert 0 < s["warmup_ratio"] < 1
    assert s["epochs"] >= 0 and s["eval_strategy"] in ("steps", "epoch")
    assert s["save_strategy"] in ("no", "steps", "epoch", "best")
    by_epochs = s["epochs"] > 0
    save_steps = s["eval_steps"] if s["save_steps"] is None else s["save_steps"]
    fractional = any(s[k] is not None and s[k] < 1 for k in STEP_KEYS)
    length = dict(num_train_epochs=s["epochs"], max_steps=-1) if by_epochs else dict(max_steps=s["steps"])
    output_dir = tempfile.mkdtemp()
    args = ORPOConfig(
        output_dir=output_dir, per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=s["batch"], **length, learning_rate=s["lr"],
        lr_scheduler_type=s["scheduler"], warmup_steps=s["warmup_ratio"],
        weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"],
        gradient_accumulation_steps=s["grad_accum"], logging_steps=s["logging_steps"],
        eval_strategy=s["eval_strategy"], eval_steps=s["eval_steps"], save_steps=save_steps, beta=s["beta"],
        max_length=s["max_length"], bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=[], seed=s["seed"], use_cpu=True, save_strategy=s["save_strategy"], remove_unused_columns=False,
        dataloader_num_workers=0, load_best_model_at_end=bool(s["load_best"]), metric_for_best_model=s["metric"],
        greater_is_better=s["greater_is_better"], save_total_limit=s["save_total_limit"] or None,
        eval_on_start=bool(s["eval_on_start"]), logging_first_step=bool(s["logging_first_step"]),
        dataloader_drop_last=bool(s["drop_last"]), eval_delay=s["eval_delay"])
    trainer_class = ORPOTrainer if s["shuffle"] else SequentialORPOTrainer
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer,
                            train_dataset=load(s["train"]), eval_dataset=load(s["eval"]))
    # TRL has no prompt truncation: a prompt that fills max_length would give NaN.
    for ds in (trainer.train_dataset, trainer.eval_dataset):
        assert all(len(r["prompt_input_ids"]) < s["max_length"] for r in ds)
    saved, loaded = SavedNorms(), []
    trainer.add_callback(saved)
    stopper = None
    if s["patience"] > 0:
        stopper = EarlyStoppingCallback(early_stopping_patience=s["patience"], early_stopping_threshold=s["threshold"])
        trainer.add_callback(stopper)
    load_best_model = trainer._load_best_model

    def record_load():  # the checkpoint _load_best_model reads, at the end of train()
        loaded.append(name(trainer.state.best_model_checkpoint))
        load_best_model()

    trainer._load_best_model = record_load
    trainer.train()
    # before trainer.evaluate() below, whose on_evaluate would count once more
    early_stopping = None if stopper is None else dict(
        patience=s["patience"], threshold=s["threshold"], counter=stopper.early_stopping_patience_counter,
        stopped_at=trainer.state.global_step, max_steps=trainer.state.max_steps)

    hist = list(trainer.state.log_history)
    best = None
    if s["load_best"] or (s["patience"] > 0 and s["metric"] is not None):  # metric-only tracking: new runs only
        st = trainer.state
        final_norms = norms(model)
        states = {}
        for ckpt in sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            js = json.load(open(ckpt / "trainer_state.json"))
            states[ckpt.name] = dict(global_step=js["global_step"], best_metric=js["best_metric"],
                                     best_global_step=js["best_global_step"],
                                     best_model_checkpoint=name(js["best_model_checkpoint"]))
        best = dict(
            metric_for_best_model=args.metric_for_best_model, greater_is_better=args.greater_is_better,
            save_total_limit=args.save_total_limit, best_metric=st.best_metric,
            best_global_step=st.best_global_step, best_model_checkpoint=name(st.best_model_checkpoint),
            loaded_checkpoint=loaded[0] if loaded else None,
            final_weights_saved_at=[k for k, v in saved.by_step.items() if v == final_norms],
            checkpoint_states=states)
        eval_after = {k: float(v) for k, v in trainer.evaluate().items()}
    resolved = dict(logging=trainer.state.logging_steps, eval=trainer.state.eval_steps, save=trainer.state.save_steps)
    max_steps = trainer.state.max_steps
    checkpoints = sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*"))
    shutil.rmtree(output_dir)
    later = any(s[k] != v for k, v in LATER.items()) or fractional
    eval_steps_used = s["eval_strategy"] == "steps" or (s["save_strategy"] == "steps" and s["save_steps"] is None)
    settings = {k: v for k, v in s.items() if not (k in LATER and v == LATER[k])
                and not (k == "steps" and by_epochs)
                and not (k == "eval_steps" and not eval_steps_used)
                and not (k == "save_steps" and s["save_strategy"] != "steps")}
    out = dict(
        source="TRL ORPOTrainer (trl.experimental.orpo), float32, CPU, every dropout zeroed, pairs in "
               + ("the Trainer's shuffled order" if s["shuffle"] else "file order") + "; train_log: the log_history entries with `loss`, eval_log: those with `eval_loss`",
        versions=dict(trl=__import__("trl").__version__, transformers=__import__("transformers").__version__,
                      torch=torch.__version__),
        settings=settings, **(dict(max_steps=max_steps, checkpoints=checkpoints) if later else {}),
        **(dict(resolved_steps=resolved) if fractional else {}),
        **(dict(early_stopping=early_stopping) if early_stopping is not None else {}),
        warmup_steps=args.get_warmup_steps(max_steps),
        train_pairs=len(trainer.train_dataset), eval_pairs=len(trainer.eval_dataset),
        at_max_length=[sum(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) == s["max_length"]
                           for r in ds) for ds in (trainer.train_dataset, trainer.eval_dataset)],
        train_log=[e for e in hist if "loss" in e], eval_log=[e for e in hist if "eval_loss" in e])
    if best is not None:
        out.update(best=best, final_param_norms=final_norms, eval_after_training=eval_after)
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

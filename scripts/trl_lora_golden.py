#!/usr/bin/env python3
"""Record reference ORPO numbers from Hugging Face TRL for one tiny model.

The output JSON pins, for the given preference pairs, what TRL's
ORPOTrainer (trl.experimental.orpo, TRL 1.16) computes in float32 on CPU:
  - the prompt/chosen/rejected texts after chat templating,
  - the token ids and labels after tokenize_row,
  - per-pair loss and metrics at the initial weights,
  - a two-pair batch's loss, metrics and per-parameter gradient L2 norms,
  - the log of a short training run (sequential order, no shuffling),
  - per-parameter L2 norms after that run,
  - eval metrics on held-out pairs after the run.

Needs: torch, transformers, trl, datasets (pip).
Usage: python3 trl_golden.py MODEL_DIR PAIRS.jsonl OUT.json [key=value ...]

LoRA variant (orpo's scripts/trl_lora_golden.py): the model is PEFT's
PeftModel.from_pretrained(MODEL_DIR, ADAPTER_INIT, is_trainable=True), so TRL trains the
same initial adapter orpo starts from (write it with `orpo train` at lr 0); the parameter
names in the output are PEFT's (`.default` dropped, as in adapter_model.safetensors).
Usage: python3 trl_lora_golden.py MODEL_DIR ADAPTER_INIT PAIRS.jsonl OUT.json [key=value ...]
PAIRS.jsonl: one pair a line, any TRL preference format; the last
`eval_pairs` lines are held out for evaluation.
Settings (defaults): steps=4 batch=2 lr=1e-3 beta=0.1 max_length=128
weight_decay=0.1 max_grad_norm=1.0 grad_accum=1 eval_pairs=4 scheduler=linear warmup=0
"""
import json
import sys
import tempfile

import datasets
import torch
from torch.utils.data import SequentialSampler
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

DEFAULTS = dict(steps=4, batch=2, lr=1e-3, beta=0.1, max_length=128, weight_decay=0.1,
                max_grad_norm=1.0, grad_accum=1, eval_pairs=4, scheduler="linear", warmup=0)


def disable_all_dropout(model):
    """Zero every dropout, functional ones too: TRL's disable_dropout only reaches nn.Dropout
    modules, and transformers' OPT applies config.dropout functionally."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


class SequentialORPOTrainer(ORPOTrainer):
    """ORPOTrainer that reads the training pairs in file order."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def peft_name(n):
    # As adapter_model.safetensors names them: DoRA's magnitude is saved without `.weight`.
    return n.replace(".default.", ".").replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def scalars(metrics):
    return {k: float(v) for k, v in metrics.items()}


def main():
    model_dir, adapter_dir, pairs_path, out_path = sys.argv[1:5]
    settings = dict(DEFAULTS)
    for kv in sys.argv[5:]:
        k, v = kv.split("=", 1)
        settings[k] = type(DEFAULTS[k])(v)
    torch.manual_seed(0)

    rows = [json.loads(line) for line in open(pairs_path) if line.strip()]
    train_rows, eval_rows = rows[: -settings["eval_pairs"]], rows[-settings["eval_pairs"]:]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    disable_all_dropout(model)

    args = ORPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=settings["batch"],
        per_device_eval_batch_size=settings["batch"], max_steps=settings["steps"],
        learning_rate=settings["lr"], lr_scheduler_type=settings["scheduler"],
        warmup_steps=settings["warmup"], weight_decay=settings["weight_decay"],
        max_grad_norm=settings["max_grad_norm"],
        gradient_accumulation_steps=settings["grad_accum"], logging_steps=1,
        beta=settings["beta"], max_length=settings["max_length"], bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], seed=0, use_cpu=True, save_strategy="no",
        eval_strategy="no", remove_unused_columns=False, dataloader_num_workers=0)
    trainer = SequentialORPOTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows))

    keep = ["prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids",
            "chosen_labels", "rejected_input_ids", "rejected_labels"]
    tokenized = [{k: row[k] for k in keep} for row in trainer.train_dataset]
    tokenized_eval = [{k: row[k] for k in keep} for row in trainer.eval_dataset]

    # Per-pair numbers at the initial weights.
    model.eval()
    per_pair = []
    with torch.no_grad():
        for row in trainer.train_dataset:
            batch = trainer.data_collator([row])
            loss, metrics = trainer.get_batch_loss_metrics(model, batch, "train")
            per_pair.append(dict(loss=float(loss), **scalars(metrics)))

    # One batch of `batch` pairs: loss, metrics and gradient norms per parameter.
    model.train()
    model.zero_grad()
    first = [trainer.train_dataset[i] for i in range(settings["batch"])]
    loss, metrics = trainer.get_batch_loss_metrics(model, trainer.data_collator(first), "train")
    loss.backward()
    grad_norms = {peft_name(n): float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    first_batch = dict(loss=float(loss), **scalars(metrics), grad_norm_by_param=grad_norms)
    model.zero_grad()

    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    final_norms = {peft_name(n): float(p.detach().norm()) for n, p in model.named_parameters() if p.requires_grad}
    decayed = sorted(peft_name(n) for n in trainer.get_decay_parameter_names(model) if ".lora_" in n)
    eval_metrics = scalars(trainer.evaluate())

    out = dict(
        source="TRL ORPOTrainer (trl.experimental.orpo) + PEFT LoRA, float32, CPU, every dropout zeroed, pairs in file order",
        versions=dict(trl=__import__("trl").__version__, transformers=__import__("transformers").__version__,
                      torch=torch.__version__),
        model=model_dir.rstrip("/").split("/")[-1], settings=settings, optimizer=str(args.optim),
        adam=dict(beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon),
        pad_token_id=tokenizer.pad_token_id, train_pairs=train_rows, eval_pairs=eval_rows,
        tokenized=tokenized, tokenized_eval=tokenized_eval, initial_per_pair=per_pair,
        initial_first_batch=first_batch, train_log=log, weight_decay_params=decayed,
        final_param_norms=final_norms, eval_after_training=eval_metrics,
        lora=json.load(open(f"{adapter_dir}/adapter_config.json")))
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

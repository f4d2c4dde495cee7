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
QLoRA (quant=nf4): the base is loaded with transformers' BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=float32)
(needs bitsandbytes); its nn.Linear layers but the head become bnb Linear4bit and PEFT wraps them
with its bnb LoRA layers. Two CPU-only pins: bitsandbytes 0.50.2's AVX-512 C kernel for
dequantize_4bit misreads absmax when a weight's rows are a multiple of 16 but not of 64 values
(tiny-llama3's down_proj, 176), so with fix_bnb_cpu_dequant=1 (default) its CPU kernel is
replaced by bitsandbytes' own torch kernel (flat 64-value blocks, as CUDA; identical results
wherever the C kernel is right); and Linear4bit's AVX512-BF16 inference repacking is switched off
so evaluation stays in float32.
optim=NAME: TrainingArguments.optim (default adamw_torch_fused, transformers 5's default, which
the goldens above ran): e.g. adamw_bnb_8bit (bitsandbytes' AdamW, optim_bits=8). With a
bitsandbytes optimizer, fix_bnb_cpu_quant=1 (default) replaces bnb 0.50.2's CPU quantize_blockwise
(a 65536-entry lookup table) by bnb's own torch kernel (nearest code, as CUDA; see
scripts/adamw8bit_golden.py, imported from this folder), and the output gains
`optimizer_state_bits`: {PEFT parameter name: 8 or 32} from the trained optimizer's state. Both
settings are written to the output's `settings` only away from the default optimizer.
PAIRS.jsonl: one pair a line, any TRL preference format; the last
`eval_pairs` lines are held out for evaluation.
Settings (defaults): steps=4 batch=2 lr=1e-3 beta=0.1 max_length=128
weight_decay=0.1 max_grad_norm=1.0 grad_accum=1 eval_pairs=4 scheduler=linear warmup=0
quant=none double_quant=0 fix_bnb_cpu_dequant=1 optim=adamw_torch_fused fix_bnb_cpu_quant=1
"""
import json
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from torch.utils.data import SequentialSampler
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

DEFAULTS = dict(steps=4, batch=2, lr=1e-3, beta=0.1, max_length=128, weight_decay=0.1,
                max_grad_norm=1.0, grad_accum=1, eval_pairs=4, scheduler="linear", warmup=0,
                quant="none", double_quant=0, fix_bnb_cpu_dequant=1)
# Settings added after the goldens above: written to the output only with another optimizer.
LATER = dict(optim="adamw_torch_fused", fix_bnb_cpu_quant=1)
DEFAULTS.update(LATER)


def bnb_cpu_dequant_is_wrong():
    """bitsandbytes' CPU dequantize_4bit against its flat-block definition, on rows of 48."""
    import bitsandbytes.functional as bnbf
    a = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(a, blocksize=64, quant_type="nf4")
    code = bnbf.get_4bit_type("nf4", device="cpu")
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 15], 1).reshape(-1).long()
    want = (code[q] * state.absmax[torch.arange(a.numel()) // 64]).reshape(a.shape)
    return not torch.equal(bnbf.dequantize_4bit(packed, state), want)


def use_bnb_torch_dequant_on_cpu():
    """Route bitsandbytes::dequantize_4bit on CPU to bitsandbytes' own torch kernel (uncompiled)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)


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
    bnb_optim = False
    if settings["optim"] != LATER["optim"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from adamw8bit_golden import fix_bnb_cpu_quant, is_bnb_optim, optimizer_state_bits
        bnb_optim = is_bnb_optim(settings["optim"])
    quant_fixed = bnb_optim and bool(settings["fix_bnb_cpu_quant"]) and fix_bnb_cpu_quant()
    torch.manual_seed(0)

    rows = [json.loads(line) for line in open(pairs_path) if line.strip()]
    train_rows, eval_rows = rows[: -settings["eval_pairs"]], rows[-settings["eval_pairs"]:]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if settings["quant"] == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    elif settings["quant"] == "nf4":
        import bitsandbytes
        fixed = bool(settings["fix_bnb_cpu_dequant"]) and bnb_cpu_dequant_is_wrong()
        if fixed:
            use_bnb_torch_dequant_on_cpu()
            assert not bnb_cpu_dequant_is_wrong()
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=bool(settings["double_quant"]),
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config)
        quantized = [n for n, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert quantized, "no Linear4bit in the model"
        for m in model.modules():
            if isinstance(m, bitsandbytes.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False  # no bf16 repacking in eval mode
        quant = dict(bitsandbytes=bitsandbytes.__version__, config=config.to_dict(), quantized_modules=quantized,
                     blocksize=model.get_submodule(quantized[0]).weight.quant_state.blocksize,
                     cpu_dequant_replaced_by_bnb_torch_kernel=fixed)
    else:
        raise ValueError(f"quant must be none or nf4, not {settings['quant']}")
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
        eval_strategy="no", remove_unused_columns=False, dataloader_num_workers=0, optim=settings["optim"])
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
    if quant is not None:
        assert torch.isfinite(loss)
        lora = [n for n, p in model.named_parameters() if ".lora_" in n]
        assert lora and all(model.get_parameter(n).grad is not None for n in lora), "a LoRA matrix has no gradient"
        assert not any(".lora_" not in n for n, p in model.named_parameters() if p.grad is not None)
    first_batch = dict(loss=float(loss), **scalars(metrics), grad_norm_by_param=grad_norms)
    model.zero_grad()

    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    final_norms = {peft_name(n): float(p.detach().norm()) for n, p in model.named_parameters() if p.requires_grad}
    decayed = sorted(peft_name(n) for n in trainer.get_decay_parameter_names(model) if ".lora_" in n)
    eval_metrics = scalars(trainer.evaluate())

    written = {k: v for k, v in settings.items()
               if k not in LATER or (settings["optim"] != LATER["optim"] and (k == "optim" or bnb_optim))}
    source = "TRL ORPOTrainer (trl.experimental.orpo) + PEFT LoRA, float32, CPU, every dropout zeroed, pairs in file order"
    if bnb_optim:
        source += (f", optim={settings['optim']} (bitsandbytes {__import__('bitsandbytes').__version__}"
                   + (", its CPU quantize_blockwise replaced by its torch kernel: nearest code)"
                      if quant_fixed else ", its CPU lookup-table quantize_blockwise)"))
    out = dict(
        source=source,
        versions=dict(trl=__import__("trl").__version__, transformers=__import__("transformers").__version__,
                      torch=torch.__version__),
        model=model_dir.rstrip("/").split("/")[-1], settings=written, optimizer=str(args.optim),
        adam=dict(beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon),
        pad_token_id=tokenizer.pad_token_id, train_pairs=train_rows, eval_pairs=eval_rows,
        tokenized=tokenized, tokenized_eval=tokenized_eval, initial_per_pair=per_pair,
        initial_first_batch=first_batch, train_log=log, weight_decay_params=decayed,
        final_param_norms=final_norms, eval_after_training=eval_metrics,
        lora=json.load(open(f"{adapter_dir}/adapter_config.json")))
    if quant is not None:
        out["quantization"] = quant
    if bnb_optim:
        out["optimizer_state_bits"] = optimizer_state_bits(trainer.optimizer, model.named_parameters(), peft_name)
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

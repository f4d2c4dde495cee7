#!/usr/bin/env python3
"""Record a full fine-tune's TRL golden with another transformers optimizer (`optim`).

The run is the shared tools/trl_golden.py's own main() (imported from ../shared/tools beside
this checkout, or from TRL_GOLDEN_DIR), with two settings on top:
  optim=NAME            TrainingArguments.optim (default adamw_torch_fused, transformers 5's
                        default, which the shared goldens used): e.g. adamw_bnb_8bit,
                        adamw_8bit, paged_adamw_8bit (bitsandbytes' AdamW with optim_bits=8;
                        on CPU "paged" falls back to plain buffers), adamw_torch.
  fix_bnb_cpu_quant=1   with a bitsandbytes optimizer: bnb 0.50.2's CPU quantize_blockwise (a
                        65536-entry lookup table, not nearest-code) is replaced by bnb's own
                        torch kernel, as CUDA quantizes (scripts/adamw8bit_golden.py). 0 keeps
                        the lookup table.
The output has trl_golden.py's keys, `optim` (and with a bnb optimizer `fix_bnb_cpu_quant`) in
`settings`, and with a bitsandbytes optimizer `optimizer_state_bits`: {parameter name: 8 or 32},
read from the trained optimizer's state (state1 uint8 or float32). transformers' create_optimizer
registers GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32}) for
every nn.Embedding module, and bnb keeps tensors under min_8bit_size (4096) in 32 bits.

Needs: torch, transformers, trl, datasets, bitsandbytes (pip). Run from the repository root:
  python3 scripts/trl_optim_golden.py MODEL_DIR PAIRS.jsonl OUT.json [key=value ...]
tests/fixtures/golden/extra/tiny-opt.adamw8bit.trl.json is:
  python3 scripts/trl_optim_golden.py tests/fixtures/tiny-opt tests/fixtures/golden/pairs-implicit.jsonl \\
    tests/fixtures/golden/extra/tiny-opt.adamw8bit.trl.json steps=5 batch=2 lr=2e-3 max_length=192 \\
    weight_decay=0.1 optim=adamw_bnb_8bit
"""
import functools
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.environ.get("TRL_GOLDEN_DIR", str(Path(__file__).resolve().parents[2] / "shared/tools")))
import trl_golden  # noqa: E402
from adamw8bit_golden import fix_bnb_cpu_quant, is_bnb_optim, optimizer_state_bits  # noqa: E402  (this folder)

DEFAULT_OPTIM = "adamw_torch_fused"  # transformers 5's default, as the shared goldens ran


def main():
    extra = dict(optim=DEFAULT_OPTIM, fix_bnb_cpu_quant=1)
    rest = []
    for kv in sys.argv[1:]:
        k = kv.split("=", 1)[0]
        if "=" in kv and k in extra:
            extra[k] = type(extra[k])(kv.split("=", 1)[1])
        else:
            rest.append(kv)
    out_path = rest[2]
    bnb = is_bnb_optim(extra["optim"])
    replaced = bnb and bool(extra["fix_bnb_cpu_quant"]) and fix_bnb_cpu_quant()

    trainers = []

    class Recorded(trl_golden.SequentialORPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    trl_golden.SequentialORPOTrainer = Recorded
    if extra["optim"] != DEFAULT_OPTIM:
        trl_golden.ORPOConfig = functools.partial(trl_golden.ORPOConfig, optim=extra["optim"])
    sys.argv = [sys.argv[0]] + rest
    trl_golden.main()

    (trainer,) = trainers
    out = json.load(open(out_path))
    out["settings"]["optim"] = extra["optim"]
    if bnb:
        out["settings"]["fix_bnb_cpu_quant"] = extra["fix_bnb_cpu_quant"]
        out["source"] += (f", optim={extra['optim']} (bitsandbytes {__import__('bitsandbytes').__version__}"
                          + (", its CPU quantize_blockwise replaced by its torch kernel: nearest code)"
                             if replaced else ", its CPU lookup-table quantize_blockwise)"))
        out["optimizer_state_bits"] = optimizer_state_bits(trainer.optimizer, trainer.model.named_parameters())
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

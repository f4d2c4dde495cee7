"""Checks an orpo LoRA adapter against PEFT: loads BASE with PEFT's PeftModel.from_pretrained
(ADAPTER), and the folder written by `orpo merge` (MERGED) with transformers; their logits on a
few token sequences must match each other and differ from the base model's.

usage: python scripts/check_peft.py BASE ADAPTER MERGED
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
vocab = base.config.vocab_size
ids = torch.randint(4, vocab, (2, 24))
with torch.no_grad():
    base_logits = base(ids).logits
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    peft_logits = peft(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_logits = merged(ids).logits
diff = (peft_logits - merged_logits).abs().max().item()
moved = (peft_logits - base_logits).abs().max().item()
scale = peft_logits.abs().max().item()
print(f"max |peft - merged| = {diff:.3e}, max |peft - base| = {moved:.3e}, max |logit| = {scale:.3e}")
assert diff <= 1e-4 * max(scale, 1.0), "PEFT and merged logits differ"
assert moved > 100 * diff, "the adapter does not change the model"
print("ok")

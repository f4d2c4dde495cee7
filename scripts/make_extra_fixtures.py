#!/usr/bin/env python3
"""Build the project's own tiny fixtures for the families the shared ones do not cover
(tests/fixtures/tiny-gemma, tiny-gemma2, tiny-gemma3, tiny-phi3, tiny-llama3, tiny-qwen3),
the same way as the shared
tools/make_fixtures.py builds its own: real Hugging Face layout, the shared 1000-token
byte-level BPE plus each family's special tokens, random weights from a fixed seed.

- tiny-gemma: GemmaForCausalLM. Embeddings scaled by sqrt(hidden), RMSNorm with (1 + w)
  (weights drawn around 0 here, so a model that forgot the 1 cannot pass), GeGLU
  (gelu_pytorch_tanh), multi-query attention with head_dim 32 != hidden / heads (as Gemma-7B's
  256 x 16 != 3072), tied head, bf16, BOS in both the template and the tokenizer, Gemma's
  `<start_of_turn>` template (trim filter, role check) in tokenizer_config.json.
- tiny-phi3: Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4). Fused `qkv_proj` and `gate_up_proj`,
  partial rotary (factor 0.5, as Phi-4-mini's 0.75) with `longrope` scaling (original context
  64, so batches of the pairs fall on both sides of it and transformers switches from the short
  to the long factors per batch; attention factor from 512 / 64), written in the hub's spelling
  (top-level `rope_theta`, `partial_rotary_factor`, `original_max_position_embeddings`, a
  `rope_scaling` dict with `type`), a sliding window of 32 tokens (shorter than the pairs),
  untied head, no BOS from the tokenizer's post-processor, Phi-3's template that ends a
  rendered conversation with EOS (so answers already end with it).
- tiny-llama3: LlamaForCausalLM with Llama 3.1's `llama3` RoPE scaling (original context 64,
  so the 8 frequencies of a 16-wide head fall in all three of its bands), theta 5e5, written as
  hub configs carry it (top-level `rope_theta`, a `rope_scaling` dict), tied head (Llama 3.2),
  no pad token, `<|begin_of_text|>` BOS and Llama 3's header template.
- tiny-gemma2: Gemma2ForCausalLM: Gemma's pieces plus norms after attention and around the
  MLP, `query_pre_attn_scalar` 24 != head_dim 32, a sliding window of 24 on layer 0 only
  (`layer_types`' default alternation), and soft caps small enough to bend (attention 1.5, final
  logits 2.0, with weights drawn at std 0.1 so scores and logits reach them).
- tiny-gemma3: Gemma3ForCausalLM (the text model, `gemma3_text`): Gemma 2's layout without soft
  caps, plus q/k norms with `1 + w`, a sliding window of 24 on layers 0 and 1 of 3
  (`sliding_window_pattern` 3), and two rotary settings written as the hub writes them:
  `rope_theta` 1e6 with `linear` scaling (factor 8, as Gemma 3 4B+) for the full layer,
  `rope_local_base_freq` 1e4 for the sliding ones.
- tiny-qwen3: Qwen3ForCausalLM: per-head RMSNorm of q and k, no biases, head_dim 32 != hidden /
  heads (as Qwen3-0.6B's 128 != 1024 / 16), tied head, no BOS, `<think>`/`</think>` as plain
  (non-special) added tokens, and a ChatML template written here in Qwen3's manner: assistant
  turns carry a `<think>` block (empty when the message has none), so each rendered answer starts
  with an empty think block, as TRL's answers do with Qwen3's own template.

Needs: torch, transformers, tokenizers (pip) and the shared tools/ folder.
Usage: python3 scripts/make_extra_fixtures.py SHARED_TOOLS_DIR OUT_DIR
Goldens: python3 SHARED_TOOLS_DIR/trl_golden.py OUT_DIR/tiny-gemma tests/fixtures/golden/pairs-chat.jsonl
         tests/fixtures/golden/tiny-gemma.trl.json max_length=192   (the same for the others)
"""
import os
import sys

import torch

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def gemma_tokenizer(mf, enc, bpe, out, eos):
    """The Gemma family's special tokens and turn template on the shared BPE, BOS prepended."""
    return mf.finish(mf.byte_level_bpe(enc, bpe),
                     ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", out,
                     dict(bos_token="<bos>", eos_token=eos, pad_token="<pad>", unk_token="<unk>",
                          chat_template=GEMMA_TEMPLATE, model_max_length=512))


def main():
    tools, root = sys.argv[1], sys.argv[2]
    sys.path.insert(0, tools)
    import make_fixtures as mf
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                              GemmaConfig, GemmaForCausalLM,
                              LlamaConfig, LlamaForCausalLM,
                              Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    enc = os.path.join(tools, "small-bpe", "vocab.json")
    bpe = os.path.join(tools, "small-bpe", "merges.txt")
    torch.manual_seed(2024)

    out = os.path.join(root, "tiny-gemma")
    tk = gemma_tokenizer(mf, enc, bpe, out, eos="<eos>")
    cfg = GemmaConfig(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                      hidden_act="gelu_pytorch_tanh", max_position_embeddings=512, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=tk.pad_token_id,
                      bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    mf.save_model(model, tk, out, torch.bfloat16)
    mf.template_into_tokenizer_config(out)

    out = os.path.join(root, "tiny-phi3")
    tk = mf.finish(mf.byte_level_bpe(enc, bpe), ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                                 "<|assistant|>", "<|end|>"], None, out,
                   dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        unk_token="<unk>", chat_template=PHI3_TEMPLATE, model_max_length=512))
    cfg = Phi3Config(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     original_max_position_embeddings=64, rms_norm_eps=1e-5,
                     rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                          short_factor=[1.0, 1.25, 1.5, 2.0],
                                          long_factor=[1.5, 3.0, 6.0, 12.0],
                                          original_max_position_embeddings=64),
                     sliding_window=32, tie_word_embeddings=False, resid_pdrop=0.1, embd_pdrop=0.1,
                     pad_token_id=tk.pad_token_id, bos_token_id=tk.bos_token_id,
                     eos_token_id=tk.eos_token_id)
    mf.save_model(Phi3ForCausalLM(cfg), tk, out, torch.float32)

    def phi3_hub_spelling(c):
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["partial_rotary_factor"] = params.pop("partial_rotary_factor")
        params.pop("original_max_position_embeddings", None)
        params["type"] = params.pop("rope_type")
        c["rope_scaling"] = params
    mf.edit_json(os.path.join(out, "config.json"), phi3_hub_spelling)

    out = os.path.join(root, "tiny-llama3")
    tk = mf.finish(mf.byte_level_bpe(enc, bpe), ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                 "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", out,
                   dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                        chat_template=LLAMA3_TEMPLATE, model_max_length=512))
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64)
    cfg = LlamaConfig(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope,
                      tie_word_embeddings=True, bos_token_id=tk.bos_token_id,
                      eos_token_id=tk.eos_token_id)
    mf.save_model(LlamaForCausalLM(cfg), tk, out, torch.bfloat16)

    def hub_spelling(c):
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = params
    mf.edit_json(os.path.join(out, "config.json"), hub_spelling)

    out = os.path.join(root, "tiny-qwen3")
    bpe_tok = mf.byte_level_bpe(enc, bpe)
    bpe_tok.add_tokens(["<think>", "</think>"])
    tk = mf.finish(bpe_tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, out,
                   dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        chat_template=QWEN3_STYLE_TEMPLATE, model_max_length=512))
    cfg = Qwen3Config(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, rms_norm_eps=1e-6,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                      tie_word_embeddings=True, use_sliding_window=False, bos_token_id=None,
                      eos_token_id=tk.eos_token_id, pad_token_id=tk.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.uniform_(0.5, 1.5)
    mf.save_model(model, tk, out, torch.bfloat16)


    out = os.path.join(root, "tiny-gemma2")
    tk = gemma_tokenizer(mf, enc, bpe, out, eos="<eos>")
    cfg = Gemma2Config(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512,
                       rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=24,
                       attn_logit_softcapping=1.5, final_logit_softcapping=2.0, initializer_range=0.1,
                       tie_word_embeddings=True, pad_token_id=tk.pad_token_id,
                       bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    mf.save_model(model, tk, out, torch.bfloat16)
    mf.template_into_tokenizer_config(out)

    out = os.path.join(root, "tiny-gemma3")
    tk = gemma_tokenizer(mf, enc, bpe, out, eos="<end_of_turn>")
    cfg = Gemma3TextConfig(vocab_size=len(tk), hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                           hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512,
                           rms_norm_eps=1e-6, sliding_window=24, sliding_window_pattern=3,
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1000000.0},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 10000.0}},
                           initializer_range=0.1, tie_word_embeddings=True, pad_token_id=tk.pad_token_id,
                           bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    mf.save_model(model, tk, out, torch.bfloat16)

    def gemma3_hub_spelling(c):
        params = c.pop("rope_parameters")
        full = dict(params["full_attention"])
        c["rope_theta"] = full.pop("rope_theta")
        c["rope_scaling"] = full
        c["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    mf.edit_json(os.path.join(out, "config.json"), gemma3_hub_spelling)

if __name__ == "__main__":
    main()

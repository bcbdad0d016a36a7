#!/usr/bin/env python3
"""Third set of tiny random-weight checkpoints + HF reference activations: the rope scalings that the
first two sets do not cover, each at lengths where it changes the result.

  tiny-qwen2-yarn        Qwen2ForCausalLM, rope_scaling yarn (factor 4, original 8): ramp + attention factor
  tiny-llama-dynamic     LlamaForCausalLM, rope_scaling dynamic (factor 4), max_position_embeddings 16 < T = 24
  tiny-phi3-longrope     Phi3ForCausalLM, rope_scaling longrope (short/long factors), partial rotary 0.5,
                         original_max_position_embeddings 8 (every call here uses the long factors)

Same layout as make_tiny_models2.py (config.json legacy, config.v5.json as transformers 5 writes it,
golden.safetensors with hidden states, logits, a left-padded batch and an 8-token greedy continuation with
the KV cache). Usage: python make_tiny_models3.py OUT_DIR [SEED]
"""
import json, os, sys
import torch
from safetensors.torch import save_file
import transformers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

OUT = sys.argv[1]
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0
torch.manual_seed(SEED)
V, T = 512, 24
common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def cfgs():
    yield ("tiny-qwen2-yarn", Qwen2ForCausalLM, Qwen2Config, dict(common, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=False),
           dict(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 8}))
    yield ("tiny-llama-dynamic", LlamaForCausalLM, LlamaConfig, dict(common, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=16),
           dict(rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    g = torch.Generator().manual_seed(7 + SEED)
    short = (1.0 + torch.rand(4, generator=g)).tolist()
    long = (2.0 + 6.0 * torch.rand(4, generator=g)).tolist()
    yield ("tiny-phi3-longrope", Phi3ForCausalLM, Phi3Config, dict(common, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=False, max_position_embeddings=64,
           original_max_position_embeddings=8),
           dict(rope_theta=10000.0, rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}))


def legacy(cfg_dict, rope):
    d = {k: v for k, v in cfg_dict.items() if k != "rope_parameters"}
    d.update(rope)
    return d


for name, cls, ccls, kw, rope in cfgs():
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    cfg = ccls.from_dict(dict(kw, **rope))
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if "bias" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(d, safe_serialization=True)
    v5 = json.load(open(os.path.join(d, "config.json")))
    json.dump(v5, open(os.path.join(d, "config.v5.json"), "w"), indent=1)
    json.dump(legacy(v5, rope), open(os.path.join(d, "config.json"), "w"), indent=1)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1000 + SEED)
    ids = torch.randint(3, V, (2, T), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        pids = ids.clone(); mask = torch.ones_like(ids)
        pids[1, :3] = 0
        mask[1, :3] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        pout = model(input_ids=pids, attention_mask=mask, position_ids=pos, use_cache=False)
        gen = model.generate(ids[:1, :12], max_new_tokens=8, do_sample=False, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
        # The same model without its rope scaling: how much the scaling moves the logits here.
        plain = json.load(open(os.path.join(d, "config.json")))
        plain.pop("rope_scaling")
        unscaled = cls(ccls.from_dict(dict(plain, _attn_implementation="eager")))
        unscaled.load_state_dict(model.state_dict())
        moved = float((unscaled.eval()(input_ids=ids, use_cache=False).logits - out.logits).abs().max())
    t = {"input_ids": ids, "padded_input_ids": pids, "attention_mask": mask, "logits": out.logits,
         "padded_logits": pout.logits, "generated_ids": gen[0, 12:]}
    for i, h in enumerate(out.hidden_states):
        t[f"hidden_states.{i}"] = h
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "golden.safetensors"))
    meta = {"model": name, "class": cls.__name__, "seed": SEED, "transformers": transformers.__version__,
            "torch": torch.__version__, "attn_implementation": "eager", "dtype": "float32",
            "hidden_states": "HF output_hidden_states: index 0 = embedding output, index i = output of block i-1, "
                             "and the LAST index is after the final norm",
            "padded": "row 1 of padded_input_ids is ids[1] with its first 3 tokens replaced by id 0, attention_mask 0 "
                      "there, position_ids counting from 0 at the first real token",
            "generated_ids": "greedy 8 new tokens after input_ids[0, :12] (KV cache on)",
            "logits_moved_by_rope_scaling": moved,
            "logits_abs_max": float(out.logits.abs().max()),
            "n_params": sum(p.numel() for p in model.parameters())}
    json.dump(meta, open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(name, meta["n_params"], "max|logit|", round(meta["logits_abs_max"], 3), "moved by scaling", moved)

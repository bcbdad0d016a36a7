#!/usr/bin/env python3
"""Writes tiny Hugging Face checkpoints (tests/fixtures/tiny-models) as GGUF files the way llama.cpp's
convert_hf_to_gguf.py lays them out: the same tensor names, metadata keys, llama's q/k row permutation,
Llama 3's rope scaling as a `rope_freqs` tensor, Phi-3's fused attn_qkv / ffn_up and LongRoPE factors as
`rope_factors_long` / `rope_factors_short`. F32 tensors (and one
Q8_0 file for the quantized fused split). No tokenizer: the engine reads ids only.

Usage: python tiny_hf_to_gguf.py FIXTURES_DIR OUT_DIR   (needs numpy, safetensors, gguf)
"""
import json, math, os, sys

import numpy as np
import gguf
from safetensors.numpy import load_file

SRC, OUT = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)

# HF name suffix -> llama.cpp name suffix, per block
BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
}
OLMO2 = dict(BLOCK, **{"post_attention_layernorm.weight": "post_attention_norm.weight",
                       "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})


def permute(w, n_head):
    # llama.cpp's LlamaModel.permute: interleaved rotary pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c, head_dim):
    rs = c["rope_scaling"]
    base = c["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def convert(name, arch, out_name, qtype=None):
    d = os.path.join(SRC, name)
    c = json.load(open(os.path.join(d, "config.json")))
    t = load_file(os.path.join(d, "model.safetensors"))
    n_head, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    w = gguf.GGUFWriter(os.path.join(OUT, out_name), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rot = int(head_dim * c.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(rot)
    table = OLMO2 if arch == "olmo2" else BLOCK
    for k, v in t.items():
        v = v.astype(np.float32)
        if k == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif k == "model.norm.weight":
            gname = "output_norm.weight"
        elif k == "lm_head.weight":
            if c.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        else:
            _, _, i, rest = k.split(".", 3)
            gname = f"blk.{i}.{table[rest]}"
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                v = permute(v, n_head)
            if arch == "llama" and rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
                v = permute(v, n_kv)
        if qtype is not None and v.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(v, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, v)
    rs = c.get("rope_scaling") or {}
    if rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(c, head_dim))
    if rs.get("rope_type", rs.get("type")) == "longrope":
        # llama.cpp's Phi3MiniModel: factors as tensors, the original length and the attention
        # factor (from max / original) in the metadata.
        orig = c["original_max_position_embeddings"]
        scale = c["max_position_embeddings"] / orig
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(attn)
        w.add_tensor("rope_factors_long.weight", np.array(rs["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rs["short_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(out_name)


convert("tiny-llama3", "llama", "tiny-llama3.gguf")
convert("tiny-qwen2", "qwen2", "tiny-qwen2.gguf")
convert("tiny-qwen3", "qwen3", "tiny-qwen3.gguf")
convert("tiny-phi3", "phi3", "tiny-phi3.gguf")
convert("tiny-olmo2", "olmo2", "tiny-olmo2.gguf")
convert("tiny-phi3", "phi3", "tiny-phi3-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
convert("tiny-phi3-longrope", "phi3", "tiny-phi3-longrope.gguf")

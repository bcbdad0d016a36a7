"""Shared by the HF sides of the benchmarks: the same model load for every script (GGUF
dequantized to f32 by transformers, eager attention, offline, a fixed thread count)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"


def load_model(models_dir, gguf, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(models_dir, gguf_file=gguf, dtype=torch.float32,
                                                attn_implementation="eager").eval()

"""HF-loop side of the patching benchmark (see bench/README.md): the golden set's implementation,
one batch-1 forward per patch (use_cache=False, logits_to_keep=1, eager, f32, 2 threads), via
torch forward pre-hooks on decoder layer L (resid_pre) and on layer L's o_proj (head z at the
last position). Prints one JSON line with seconds per sweep and the values."""
import argparse, json, os, time

p = argparse.ArgumentParser()
p.add_argument("--models-dir", required=True)
p.add_argument("--gguf", required=True)
p.add_argument("--clean-ids", required=True)
p.add_argument("--corrupted-ids", required=True)
p.add_argument("--a", type=int, required=True)
p.add_argument("--b", type=int, required=True)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
import torch
from hf_common import load_model

model = load_model(a.models_dir, a.gguf, a.threads)
clean = torch.tensor([json.loads(a.clean_ids)])
corr = torch.tensor([json.loads(a.corrupted_ids)])
layers = model.model.layers
L, S = len(layers), clean.shape[1]
H = model.config.num_attention_heads
hd = getattr(model.config, "head_dim", model.config.hidden_size // H)

def run(ids):
    with torch.inference_mode():
        lg = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
    return (lg[a.a] - lg[a.b]).item()

# Caches of the clean run.
resid, zin = {}, {}
hs = []
for l, layer in enumerate(layers):
    hs.append(layer.register_forward_pre_hook(lambda m, args, kw, l=l: resid.__setitem__(l, (args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True))
    hs.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, l=l: zin.__setitem__(l, args[0].clone())))
run(clean)
for h in hs: h.remove()

t0 = time.perf_counter()
resid_vals = []
for l in range(L):
    row = []
    for pos in range(S):
        def pre(m, args, kw, pos=pos, l=l):
            x = (args[0] if args else kw["hidden_states"]).clone(); x[:, pos] = resid[l][:, pos]
            if args: return (x,) + tuple(args[1:]), kw
            kw = dict(kw); kw["hidden_states"] = x; return args, kw
        h = layers[l].register_forward_pre_hook(pre, with_kwargs=True)
        row.append(run(corr)); h.remove()
    resid_vals.append(row)
t_resid = time.perf_counter() - t0
t0 = time.perf_counter()
head_vals = []
for l in range(L):
    row = []
    for hh in range(H):
        def pre(m, args, l=l, hh=hh):
            x = args[0].clone(); x[:, -1, hh * hd:(hh + 1) * hd] = zin[l][:, -1, hh * hd:(hh + 1) * hd]
            return (x,)
        h = layers[l].self_attn.o_proj.register_forward_pre_hook(pre)
        row.append(run(corr)); h.remove()
    head_vals.append(row)
t_head = time.perf_counter() - t0
print(json.dumps({"impl": "hf-transformers loop", "resid_sweep_s": t_resid, "head_sweep_s": t_head,
                  "total_s": t_resid + t_head, "n_forwards": L * S + L * H,
                  "resid_pre": resid_vals, "z_last": head_vals}))

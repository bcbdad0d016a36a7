"""The peer for `bench/crosscoder.sh`: the same L1 crosscoder objective as `persona-lens diff
train` (dictionary_learning's CrossCoder forward, Anthropic's decoder-norm-weighted L1, Adam,
the same batch size and steps) in PyTorch on the same paired store, timed the same way.
Prints one JSON line: rows/s and peak RSS."""
import json, resource, sys, time
import torch
from safetensors.torch import load_file

store, steps, batch, dict_size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
meta = json.load(open(f"{store}/paired.json"))
x = torch.cat([load_file(f"{store}/{s['file']}")["acts"] for s in meta["shards"]])
n, nm, d = x.shape
mean, std = x.mean(0), x.std(0)
scale = 1.0 / torch.sqrt((std ** 2).sum(-1) + 1e-8)
x = (x - mean) * scale[None, :, None]
w = torch.randn(nm, dict_size, d)
w = w / w.norm(dim=-1, keepdim=True) * 0.1
w_dec = torch.nn.Parameter(w.clone())
w_enc = torch.nn.Parameter(w.transpose(1, 2).clone())
b_enc = torch.nn.Parameter(torch.zeros(dict_size))
b_dec = torch.nn.Parameter(torch.zeros(nm, d))
opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-3)
perm = torch.randperm(n)

def step(i):
    idx = perm[(torch.arange(batch) + i * batch) % n]
    xb = x[idx]
    f = torch.relu(torch.einsum("bld,ldf->bf", xb, w_enc) + b_enc)
    recon = torch.einsum("bf,lfd->bld", f, w_dec) + b_dec
    mse = (xb - recon).pow(2).sum((1, 2)).mean()
    l1 = (f * w_dec.norm(dim=2).sum(0)).sum(1).mean()
    loss = mse + 0.02 * l1
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

for i in range(10):  # warm-up
    step(i)
t0 = time.perf_counter()
for i in range(steps):
    loss = step(i)
secs = time.perf_counter() - t0
print(json.dumps({"peer": f"torch {torch.__version__}", "rows_per_s": steps * batch / secs, "seconds": secs,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "final_loss": loss}))

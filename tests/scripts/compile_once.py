"""Compile a model with backend="fxshear" in a fresh process; print what a warm cache must reproduce.

Run twice with the same TORCHINDUCTOR_CACHE_DIR: the second run is served by Inductor's FX-graph
and AOTAutograd caches. fxshear is not imported before compiling: the entry point finds it.
"""

import hashlib
import json
import sys

import torch
from torch._dynamo.utils import counters

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 96), torch.nn.GELU(),
                            torch.nn.Linear(96, 32))
x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
compiled = torch.compile(model, backend="fxshear", options={"preset": sys.argv[1]})
loss = compiled(x).square().mean()
loss.backward()

import fxshear  # noqa: E402  (only now, to read the ledger)

regions = fxshear.regions_of(model)
print(json.dumps({
    "loss": loss.item(),
    "grads": {n: hashlib.sha256(p.grad.numpy().tobytes()).hexdigest() for n, p in model.named_parameters()},
    "ledger": fxshear.ledger(model).to_dict(),
    "graphs": [r.readable_graphs() for r in regions],
    "replayed": [r.replayed for r in regions],
    "aot_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
    "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
}))

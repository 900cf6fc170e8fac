"""Compare adapters bit for bit: python bench/same_adapters.py A/adapter_model.safetensors B/... (exit 1 if any differ)."""
import sys

import torch
from safetensors.torch import load_file

first = load_file(sys.argv[1])
ok = True
for other in sys.argv[2:]:
    b = load_file(other)
    diff = max((first[k].float() - b[k].float()).abs().max().item() for k in first) if first.keys() == b.keys() else None
    same = first.keys() == b.keys() and all(torch.equal(first[k], b[k]) for k in first)
    ok &= same
    print(f"{'IDENTICAL' if same else 'DIFFERENT'} {sys.argv[1]} vs {other} (max abs diff {diff})")
sys.exit(0 if ok else 1)

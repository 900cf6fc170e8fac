"""Write a random-weight gpt-oss checkpoint in the hub's MXFP4 layout (the root of openai/gpt-oss-20b).

Speed and memory depend on shapes only, so random codes do: e2m1 codes uniform, block scales
2^-8..2^-5 (weights of roughly the real model's size), everything else bf16 normal(0, 0.02).
    python bench/make_checkpoint.py /tmp/gpt-oss-20b-random [--preset gpt-oss-20b]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GptOssConfig  # noqa: E402
from model.gpt_oss import hub_shapes  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--preset", default="gpt-oss-20b")
    args = p.parse_args()
    config = GptOssConfig.from_name(args.preset)
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    shapes = hub_shapes(config)
    os.makedirs(args.folder, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are much faster there
    g = torch.Generator(dev).manual_seed(0)
    weight_map, shard, n_shard, size = {}, {}, 0, 0

    def flush():
        nonlocal shard, n_shard, size
        if shard:
            n_shard += 1
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, os.path.join(args.folder, name))
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, i, o = shape  # stored (experts, out, in/32, 16) and (experts, out, in/32)
            shard[name + "_blocks"] = torch.randint(0, 256, (e, o, i // 32, 16), dtype=torch.uint8, generator=g, device=dev).cpu()
            shard[name + "_scales"] = torch.randint(119, 123, (e, o, i // 32), dtype=torch.uint8, generator=g, device=dev).cpu()
        elif name.endswith("norm.weight"):
            shard[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[name] = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()
        size = sum(t.numel() * t.element_size() for t in shard.values())
        if size > 4e9:
            flush()
    flush()
    # rename shards to the hub's -of- form now that the count is known
    final = {}
    for k, v in weight_map.items():
        i = int(v[6:11])
        final[k] = f"model-{i:05d}-of-{n_shard:05d}.safetensors"
    for i in range(1, n_shard + 1):
        os.rename(os.path.join(args.folder, f"model-{i:05d}.safetensors"),
                  os.path.join(args.folder, f"model-{i:05d}-of-{n_shard:05d}.safetensors"))
    with open(os.path.join(args.folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": final}, f)
    with open(os.path.join(args.folder, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1)
    print(f"wrote {n_shard} shards to {args.folder}")


if __name__ == "__main__":
    main()

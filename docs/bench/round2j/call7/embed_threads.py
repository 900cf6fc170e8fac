"""Session 21, call 7: the CPU embedding's lookup as GptOss.embed does it (nn.Embedding on the CPU, then a
blocking copy to the GPU), gpt-oss-20b's table (201,088 x 2,880 bf16), 2,048 and 4,096 tokens, under
torch's default intra-op threads and under 1, 4 and 16, on an otherwise idle machine."""
import json, os, statistics, time
import torch

table = torch.nn.Embedding(201088, 2880, dtype=torch.bfloat16).requires_grad_(False)
default = torch.get_num_threads()
print(json.dumps({"default_threads": default, "cpus": os.cpu_count()}), flush=True)
for threads in (default, 1, 4, 16):
    torch.set_num_threads(threads)
    for t in (2048, 4096):
        ids = torch.randint(0, 201088, (1, t))
        lookup, total = [], []
        for i in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = table(ids)
            t1 = time.perf_counter()
            x = x.to("cuda")
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 5:
                lookup.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
        print(json.dumps({"threads": threads, "tokens": t, "lookup_ms": round(statistics.median(lookup), 3),
                          "until_on_gpu_ms": round(statistics.median(total), 3)}), flush=True)

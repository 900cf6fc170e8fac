"""Session 21, call 2: the CPU embedding's lookup for one micro-batch, until its rows are on the GPU,
as before (gathered into pageable memory, a blocking copy) and now (GptOss.embed with
../call2_pinned_embedding.patch applied, not kept: pinned memory, a non-blocking copy), gpt-oss-20b's table (201,088 x 2,880 bf16), 2,048 and 4,096 tokens."""
import json, statistics, sys, os, time
import torch
sys.path.insert(0, os.getcwd())
from model import GptOss, GptOssConfig

config = GptOssConfig.from_name("gpt-oss-20b")
table = torch.nn.Embedding(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
model = GptOss.__new__(GptOss)
torch.nn.Module.__init__(model)
model.model = torch.nn.Module()
model.model.embed_tokens = table.requires_grad_(False)
model.model.norm = torch.nn.Module()
model.model.norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size, device="cuda"))
for t in (2048, 4096):
    ids = torch.randint(0, config.vocab_size, (1, t))
    for name, fn in (("pageable, blocking (before)", lambda: table(ids).to("cuda")),
                     ("pinned, non-blocking (GptOss.embed)", lambda: model.embed(ids))):
        times, host = [], []
        for i in range(40):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 5:
                host.append((t1 - t0) * 1e3)
                times.append((t2 - t0) * 1e3)
        assert torch.equal(x.cpu(), table(ids))
        print(json.dumps({"tokens": t, "lookup": name, "host_ms": round(statistics.median(host), 3),
                          "until_on_gpu_ms": round(statistics.median(times), 3)}), flush=True)

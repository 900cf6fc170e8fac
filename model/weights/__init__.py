"""How the weights are stored and read: NF4 storage of frozen weights, MXFP4 storage of the experts,
and the streaming loader of hub checkpoints."""
import logging

# bitsandbytes' CPU backend looks for an optional faster CPU 4-bit matmul (the `kernels` package) when
# it is imported, and logs a warning on every start without it. Its plain fallback is what runs, and
# our CPU path does not depend on that matmul, so that one message (and no other) is dropped. (Here,
# before nf4.py or mxfp4.py, whichever comes first, imports bitsandbytes.)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

"""How the weights are stored and read: NF4 storage of frozen weights, MXFP4 dequantisation, and the
streaming loader of hub checkpoints."""

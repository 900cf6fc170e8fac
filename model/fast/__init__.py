"""The fast paths: Triton kernels, CUDA graphs, compiled chains, flex attention, and the gate that
chooses them per device (`gate.decide`). Each has a plain twin in model/ that the tests compare it with."""

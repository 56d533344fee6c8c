"""Model execution: the forward passes, their kernels and CUDA graphs, and the KV cache."""

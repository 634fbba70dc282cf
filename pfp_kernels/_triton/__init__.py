"""Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1). Imported lazily by the op modules,
so that pfp_kernels imports without triton installed."""

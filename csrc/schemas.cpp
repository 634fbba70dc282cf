// Operator schemas of the pfp library. Kernels live beside this file (one file per op family) and
// register with TORCH_LIBRARY_IMPL; pip builds them into one library per CPU ISA
// (pfp_kernels._cpu_*, see setup.py), of which one is loaded. Fake (meta) kernels and autograd
// are registered from Python (pfp_kernels/conv/, pfp_kernels/attention/), and Triton kernels
// for CUDA are separate Python custom ops (pfp::*_triton), because CUDA C++ cannot be built
// against a CPU torch.
#include <torch/library.h>

TORCH_LIBRARY(pfp, m) {
  // Fused y = act(conv3d(x, weight) + bias). x: [B, Cin, T, H, W] (channels-last-3d preferred),
  // weight: [Cout, Cin, kt, kh, kw]; y: [B, Cout, To, Ho, Wo] in channels-last-3d.
  m.def("conv3d_act(Tensor x, Tensor weight, Tensor? bias, int[3] stride, int[3] padding, str activation) -> Tensor");
  // Causal-in-time conv over the virtual sequence V = [prev ; x] (frames of prev first).
  // Output frame m reads V[time_offset + stride_t*m + dt], dt in [0, kt); V indices < 0 are zeros,
  // so a fresh stream passes prev=None, time_offset=-(kt-1). H and W use ordinary zero padding.
  // The concatenation is never materialised. y: [B, Cout, num_out, Ho, Wo] in channels-last-3d.
  m.def("causal_conv3d_act(Tensor x, Tensor? prev, Tensor weight, Tensor? bias, int[3] stride, int[2] padding_hw, str activation, int time_offset, int num_out) -> Tensor");
  // 1x1x1 projection written as tokens: h [B, C, T, H, W] -> [B, T*H*W, Cout] (+ bias + residual).
  // weight: [Cout, C]; residual: [B, T*H*W, Cout].
  m.def("project_tokens(Tensor h, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
  // Softmax attention of q over [context ; target] keys/values, flash-attn layout [B, N, H, D].
  // context_k/v may have batch 1 to serve a batch of B without a copy. Returns (out [B, Nq, H, D],
  // lse [B, H, Nq] float32, natural log). context_mask: [B or 1, Nc] bool, False = that context key
  // takes no part for that sample; a query left with no key gets out 0 and lse -inf.
  m.def("joint_attention(Tensor q, Tensor k, Tensor v, Tensor? context_k, Tensor? context_v, float scale, Tensor? context_mask=None) -> (Tensor, Tensor)");
}

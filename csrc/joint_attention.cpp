// CPU kernel of pfp::joint_attention: softmax attention of q over [context ; target] keys/values,
// flash-attn layout [B, N, H, D], without building the concatenation.
//
// Each key/value segment goes through ATen's CPU flash-attention kernel in place (the [B,N,H,D]
// tensors are passed as transposed views, which that kernel reads by stride; a batch-1 context is
// a stride-0 expand), which also returns each query's log-sum-exp. The two partial results are
// then merged exactly in one fused pass: w = sigmoid(lse_t - lse_c) = exp(lse_t - lse),
// out = o_c + w (o_t - o_c), lse = logaddexp(lse_c, lse_t). The merge reads each partial output
// once and writes the result in place over the context one, instead of the five or so
// elementwise passes (plus fp32 round trips for bf16) it costs in PyTorch.
// benchmarks/bench_attention.py compares this with SDPA over the concatenation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace pfp {
namespace {

using at::Tensor;

// ATen's CPU flash kernel reads B, N and H by stride but assumes a unit stride along D (it gives
// wrong results for, e.g., k[..., ::2]); such inputs are copied to contiguous first.
Tensor unit_stride_d(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

// One segment: (out [B, Nq, H, D] contiguous, lse [B, H, Nq] float32).
std::tuple<Tensor, Tensor> attend_segment(const Tensor& q, const Tensor& k, const Tensor& v,
                                          double scale) {
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), /*dropout_p=*/0.0,
      /*is_causal=*/false, /*attn_mask=*/std::nullopt, scale);
  // The kernel allocates its output as [B, Nq, H, D] and returns the [B, H, Nq, D] view (its
  // lse likewise lives as [B, Nq, H]); read both by stride.
  return {std::get<0>(res).transpose(1, 2), std::get<1>(res)};
}

// o1 <- merge(o1, lse1, o2, lse2) in place (o1, o2 contiguous [B, Nq, H, D]);
// lse <- logaddexp(lse1, lse2) (lse contiguous [B, H, Nq], lse1/lse2 any strides).
template <typename scalar_t>
void merge_in_place(Tensor& o1, const Tensor& lse1, const Tensor& o2, const Tensor& lse2, Tensor& lse) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t batch = o1.size(0), n_q = o1.size(1), heads = o1.size(2), dim = o1.size(3);
  scalar_t* out = o1.data_ptr<scalar_t>();
  const scalar_t* other = o2.data_ptr<scalar_t>();
  const float* l1 = lse1.data_ptr<float>();
  const float* l2 = lse2.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  const int64_t s1b = lse1.stride(0), s1h = lse1.stride(1), s1i = lse1.stride(2);
  const int64_t s2b = lse2.stride(0), s2h = lse2.stride(1), s2i = lse2.stride(2);
  const int64_t rows = batch * n_q * heads;  // rows of [B, Nq, H] in out's memory order
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % heads, i = (r / heads) % n_q, b = r / (heads * n_q);
      const float a = l1[b * s1b + h * s1h + i * s1i], c = l2[b * s2b + h * s2h + i * s2i];
      const float hi = std::max(a, c);
      float lse, w;
      if (hi == -std::numeric_limits<float>::infinity()) {
        lse = hi;  // neither segment has a key for this query (cannot happen with Nc + Nk >= 1)
        w = 0.f;
      } else {
        lse = hi + std::log1p(std::exp(std::min(a, c) - hi));
        w = std::exp(c - lse);
      }
      l[(b * heads + h) * n_q + i] = lse;
      scalar_t* dst = out + r * dim;
      const scalar_t* src = other + r * dim;
      at::vec::map2<scalar_t>(
          [w](Vec x, Vec y) { return x + (y - x) * Vec(w); }, dst, dst, src, dim);
    }
  });
}

std::tuple<Tensor, Tensor> joint_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                               const std::optional<Tensor>& context_k,
                                               const std::optional<Tensor>& context_v,
                                               double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "pfp::joint_attention: q, k, v must be 4-D [B, N, H, D]");
  const Tensor q = unit_stride_d(q_in), k = unit_stride_d(k_in), v = unit_stride_d(v_in);
  TORCH_CHECK(context_k.has_value() == context_v.has_value(),
              "pfp::joint_attention: context_k and context_v must be given together");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              "pfp::joint_attention (CPU): dtype must be float32, bfloat16 or float16, got ",
              q.scalar_type());
  const int64_t batch = q.size(0), n_q = q.size(1), heads = q.size(2), dim = q.size(3);
  const bool has_ctx = context_k.has_value() && context_k->size(1) > 0;
  const bool has_tgt = k.size(1) > 0;
  if (batch * n_q * heads == 0 || (!has_ctx && !has_tgt)) {
    TORCH_CHECK(batch * n_q * heads == 0, "pfp::joint_attention: there are no keys");
    return {at::empty({batch, n_q, heads, dim}, q.options()),
            at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat))};
  }
  // Outputs are contiguous, as the fake kernel (pfp_kernels/attention.py) declares.
  if (!has_ctx) {
    auto [out, lse] = attend_segment(q, k, v, scale);
    return {out.contiguous(), lse.contiguous()};
  }
  // batch 1 -> stride 0, no copy (a D-strided context is made contiguous before, once)
  Tensor ck = unit_stride_d(*context_k).expand({batch, -1, -1, -1});
  Tensor cv = unit_stride_d(*context_v).expand({batch, -1, -1, -1});
  auto [out, lse_c] = attend_segment(q, ck, cv, scale);
  out = out.contiguous();  // a no-op with today's ATen (checked by the tests' stride checks)
  if (!has_tgt) return {out, lse_c.contiguous()};
  auto [out_t, lse_t] = attend_segment(q, k, v, scale);
  out_t = out_t.contiguous();
  Tensor lse = at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat: merge_in_place<float>(out, lse_c, out_t, lse_t, lse); break;
    case at::kBFloat16: merge_in_place<at::BFloat16>(out, lse_c, out_t, lse_t, lse); break;
    default: merge_in_place<at::Half>(out, lse_c, out_t, lse_t, lse); break;  // checked above
  }
  return {out, lse};
}

}  // namespace
}  // namespace pfp

TORCH_LIBRARY_IMPL(pfp, CPU, m) { m.impl("joint_attention", &pfp::joint_attention_cpu); }

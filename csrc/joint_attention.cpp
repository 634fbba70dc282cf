// CPU kernel of pfp::joint_attention: softmax attention of q over [context ; target] keys/values,
// flash-attn layout [B, N, H, D], without building the concatenation.
//
// Three routes; pfp::_attention_cpu_path forces one (tests, benchmarks), and
// pfp::_attention_cpu_last_route says which one the last call on this thread ran.
//
// "flash" (the default): our own two-segment FlashAttention-2-style forward. at::parallel_for over
//   tasks (batch, head, chunk of queries). A task walks the keys of [context ; target] as one
//   virtual sequence in blocks of KV_BLOCK; a block may straddle the two segments, so the context's
//   tail does not waste a block. Each key/value block is converted once per task into a per-thread
//   fp32 buffer of KV_BLOCK x D (bf16/fp16 -> fp32, fp32 copied: the packed block measured as fast
//   as reading fp32 in place, and it makes every dtype and stride one code path); the queries of the
//   chunk, pre-scaled, likewise. Then, per sub-block of Q_BLOCK queries: S = Q K^T and O += P V as
//   fp32 SGEMMs (MKL's sgemm_, which libtorch_cpu exports), and the online softmax in fp32 with
//   at::vec's exp_u20. A batch-1 context is read through stride 0, never copied; scratch per thread
//   is bounded by the block sizes (see choose_blocks). Returns the LSE like the other route.
//   Why not ATen's kernel: its bf16 path on CPUs without AVX512-BF16 lost to one SDPA call over the
//   concatenation (0.94-1.00x at B=1, H=8, D=64, Nc=1365, Nq=Nk=585), and two calls plus a merge
//   cost more than one pass; benchmarks/bench_attention.py measures both routes.
//
// "segments": ATen's CPU flash-attention kernel once per segment, in place (the [B,N,H,D] tensors
//   are passed as transposed views, which that kernel reads by stride; a batch-1 context is a
//   stride-0 expand), each returning its log-sum-exp; the two partial results are merged exactly in
//   one fused pass: w = exp(lse_t - lse), out = o_c + w (o_t - o_c), lse = logaddexp(lse_c, lse_t).
//   Runs when this torch exports no sgemm_ (the weak symbol below is then null), or when forced.
//
// "concat": ATen's CPU flash kernel once over [context ; target], built by one copy of the keys and
//   values (what SDPA over the concatenation does). The default for bf16 with both segments on
//   CPUs with AMX-BF16, where ATen's kernel runs bf16 tiles and our fp32-SGEMM kernel loses.
//
// A context key mask ([B or 1, Nc] bool, False = absent for that sample) reaches every route: the
// flash route sets masked scores to -inf (a row with no valid key yet skips its block), the ATen
// routes pass it as an additive mask. A query left with no key at all gets out 0 and lse -inf.
// Per-operator ATen headers (see conv3d_act.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>

#include "pfp_common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

// Fortran BLAS SGEMM (column-major). libtorch_cpu exports MKL's; weak, so a torch built without it
// still loads this library, and the "segments" route runs instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace pfp {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// ------------------------------------------------------------------------------------------------
// Route control, for tests and benchmarks.
// ------------------------------------------------------------------------------------------------
enum class Route : int { Auto = 0, Flash = 1, Segments = 2, Concat = 3 };
RouteSwitch<4> g_route("pfp::_attention_cpu_path", {"auto", "flash", "segments", "concat"});
thread_local std::string g_last_route;

std::string set_attention_cpu_path(c10::string_view mode) { return g_route.set(mode); }

std::string last_attention_cpu_route() { return g_last_route; }

bool have_sgemm() { return sgemm_ != nullptr; }

// Whether the CPU has AMX with bf16 tiles (CPUID.(EAX=7,ECX=0):EDX bits 22 and 24), which ATen's
// CPU flash-attention kernel uses for bf16 through oneDNN's brgemm: there one ATen call over the
// concatenation beats our fp32-SGEMM kernel (bench_attention.py, AVX-512 + AMX machine: 0.46x).
bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return ((edx >> 22) & 1u) && ((edx >> 24) & 1u);
  }();
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------------------------
// "segments" route
// ------------------------------------------------------------------------------------------------
// One segment: (out [B, Nq, H, D] contiguous, lse [B, H, Nq] float32).
// keep: [B, N] bool key mask or undefined. ATen's kernel takes an additive mask in q's dtype, and
// gives a query whose keys are all masked out 0 and lse 0; its lse becomes -inf here, so a merge
// leaves that segment out.
std::tuple<Tensor, Tensor> attend_segment(const Tensor& q, const Tensor& k, const Tensor& v,
                                          double scale, const Tensor& keep = Tensor()) {
  std::optional<Tensor> mask;
  if (keep.defined())
    mask = at::zeros(keep.sizes(), q.options()).masked_fill_(keep.logical_not(), -INFINITY).view(
        {keep.size(0), 1, 1, keep.size(1)});
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), /*dropout_p=*/0.0,
      /*is_causal=*/false, mask, scale);
  // The kernel allocates its output as [B, Nq, H, D] and returns the [B, H, Nq, D] view (its
  // lse likewise lives as [B, Nq, H]); read both by stride.
  Tensor lse = std::get<1>(res);
  if (keep.defined())
    lse = lse.masked_fill(keep.any(1).logical_not().view({keep.size(0), 1, 1}), -INFINITY);
  return {std::get<0>(res).transpose(1, 2), lse};
}

// o1 <- merge(o1, lse1, o2, lse2) in place (o1, o2 contiguous [B, Nq, H, D]);
// lse <- logaddexp(lse1, lse2) (lse contiguous [B, H, Nq], lse1/lse2 any strides).
template <typename scalar_t>
void merge_in_place(Tensor& o1, const Tensor& lse1, const Tensor& o2, const Tensor& lse2, Tensor& lse) {
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

// ATen's CPU flash kernel reads B, N and H by stride but assumes a unit stride along D (it gives
// wrong results for, e.g., k[..., ::2]); such inputs are copied to contiguous first.
Tensor unit_stride_d(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> segments_route(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                          const Tensor& ck_in, const Tensor& cv_in, bool has_ctx,
                                          bool has_tgt, double scale, const Tensor& keep_c) {
  const Tensor q = unit_stride_d(q_in), k = unit_stride_d(k_in), v = unit_stride_d(v_in);
  Tensor ck, cv;
  if (has_ctx) {  // contiguous before the batch expand, so a batch-1 context stays one copy
    ck = unit_stride_d(ck_in).expand({q.size(0), -1, -1, -1});
    cv = unit_stride_d(cv_in).expand({q.size(0), -1, -1, -1});
  }
  const int64_t batch = q.size(0), n_q = q.size(1), heads = q.size(2);
  // Outputs are contiguous, as the fake kernel (pfp_kernels/attention/) declares.
  if (!has_ctx) {
    auto [out, lse] = attend_segment(q, k, v, scale);
    return {out.contiguous(), lse.contiguous()};
  }
  auto [out, lse_c] = attend_segment(q, ck, cv, scale, keep_c);
  out = out.contiguous();  // a no-op with today's ATen (checked by the tests' stride checks)
  if (!has_tgt) return {out, lse_c.contiguous()};
  auto [out_t, lse_t] = attend_segment(q, k, v, scale);
  out_t = out_t.contiguous();
  Tensor lse = at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat: merge_in_place<float>(out, lse_c, out_t, lse_t, lse); break;
    case at::kBFloat16: merge_in_place<at::BFloat16>(out, lse_c, out_t, lse_t, lse); break;
    default: merge_in_place<at::Half>(out, lse_c, out_t, lse_t, lse); break;  // checked by caller
  }
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------
// "flash" route
// ------------------------------------------------------------------------------------------------
// dst[0:n] = float(src[0:n * stride : stride]) * mul
template <typename scalar_t>
inline void row_to_float(const scalar_t* src, int64_t stride, float* dst, int64_t n, float mul) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]) * mul;
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec m(mul);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * m).store(dst + i);
    for (; i < n; ++i) dst[i] = src[i] * mul;
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    const Vec m(mul);
    int64_t i = 0;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
      (lo * m).store(dst + i);
      (hi * m).store(dst + i + Vec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
  }
}

// dst[0:n] = scalar_t(src[0:n] * mul)
template <typename scalar_t>
inline void row_from_float(const float* src, scalar_t* dst, int64_t n, float mul) {
  const Vec m(mul);
  if constexpr (std::is_same_v<scalar_t, float>) {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * m).store(dst + i);
    for (; i < n; ++i) dst[i] = src[i] * mul;
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      Vec lo = Vec::loadu(src + i) * m, hi = Vec::loadu(src + i + Vec::size()) * m;
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * mul);
  }
}

inline void sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  const float one = 1.f;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
}

// One key/value segment as the kernel reads it: element (b, j, h, d) at ptr + b*sb + j*sn + h*sh + d*sd.
template <typename scalar_t>
struct Seg {
  const scalar_t* k;
  const scalar_t* v;
  int64_t n;
  int64_t ksb, ksn, ksh, ksd, vsb, vsn, vsh, vsd;
  const bool* keep = nullptr;  // key j of batch b takes part iff keep[b * keep_sb + j] (null: all do)
  int64_t keep_sb = 0;
};

template <typename scalar_t>
Seg<scalar_t> make_seg(const Tensor& k, const Tensor& v) {
  return {k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.size(1),
          k.stride(0), k.stride(1), k.stride(2), k.stride(3),
          v.stride(0), v.stride(1), v.stride(2), v.stride(3)};
}

struct Blocks {
  int64_t q_chunk, q_block, kv_block;
};

// Block sizes, measured on Zen 3 (AVX2) at B=1, H=8, D=64, Nc=1365, Nq=Nk=585 (CPU time of one
// thread, the VM being shared): 96-256 queries x 128-512 keys were within 3-4% of each other in
// bf16 (32 queries ~5% slower), 64 vs 128 queries the same in fp32; 128 x 256 keeps the score block at 128 KiB and the fp32 K/V blocks at 2 x 64 KiB
// for D=64. Query chunks are as long as possible (every chunk re-reads and re-converts all keys and
// values), at most 64K floats of fp32 Q and O each, with at least two tasks per thread.
constexpr int64_t Q_BLOCK = 128;
constexpr int64_t KV_BLOCK = 256;
constexpr int64_t Q_CHUNK_FLOATS = 65536;

Blocks choose_blocks(int64_t batch, int64_t heads, int64_t n_q, int64_t dim) {
  const int64_t threads = at::get_num_threads();
  const int64_t max_chunk = std::max(Q_BLOCK, Q_CHUNK_FLOATS / std::max<int64_t>(dim, 1));
  const int64_t per_head = std::max<int64_t>(1, (2 * threads + batch * heads - 1) / (batch * heads));
  const int64_t n_chunks = std::max(per_head, (n_q + max_chunk - 1) / max_chunk);
  const int64_t chunk = std::max<int64_t>(1, (n_q + n_chunks - 1) / n_chunks);
  return {chunk, std::min(Q_BLOCK, chunk), KV_BLOCK};
}

template <typename scalar_t>
void flash_forward(const Tensor& q, const Seg<scalar_t>& ctx, const Seg<scalar_t>& tgt, float scale,
                   const Blocks& bs, Tensor& out, Tensor& lse) {
  const int64_t batch = q.size(0), n_q = q.size(1), heads = q.size(2), dim = q.size(3);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2), qsd = q.stride(3);
  scalar_t* op = out.data_ptr<scalar_t>();  // contiguous [B, Nq, H, D]
  float* lp = lse.data_ptr<float>();        // contiguous [B, H, Nq]
  const int64_t n_c = ctx.n, n_kv = ctx.n + tgt.n;
  const int64_t q_chunk = bs.q_chunk, q_block = bs.q_block, kv_block = bs.kv_block;
  const int64_t chunks = (n_q + q_chunk - 1) / q_chunk;
  const int64_t tasks = batch * heads * chunks;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, bounded by the block sizes: Q and O of one chunk, one score block,
    // one converted key and value block, running max and sum.
    const int64_t q_elems = q_chunk * dim, s_elems = q_block * kv_block;
    const int64_t kv_elems = kv_block * dim;
    std::unique_ptr<float[]> buf(new float[2 * q_elems + s_elems + 2 * kv_elems + 2 * q_chunk]);
    std::unique_ptr<int64_t[]> masked_buf(new int64_t[kv_block]);
    int64_t* masked_cols = masked_buf.get();
    float* qf = buf.get();
    float* of = qf + q_elems;
    float* sf = of + q_elems;
    float* kf = sf + s_elems;
    float* vf = kf + kv_elems;
    float* mrow = vf + kv_elems;
    float* lrow = mrow + q_chunk;

    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % chunks, h = (t / chunks) % heads, b = t / (chunks * heads);
      const int64_t i0 = c * q_chunk, rows = std::min(q_chunk, n_q - i0);
      for (int64_t i = 0; i < rows; ++i)
        row_to_float(qp + b * qsb + (i0 + i) * qsn + h * qsh, qsd, qf + i * dim, dim, scale);
      std::fill(of, of + rows * dim, 0.f);
      std::fill(mrow, mrow + rows, neg_inf);
      std::fill(lrow, lrow + rows, 0.f);

      // Pieces of the key block [j0, j0 + n): (segment, first row in it, rows, column in S).
      struct Piece { const Seg<scalar_t>* seg; int64_t j, n, col; };
      for (int64_t j0 = 0; j0 < n_kv; j0 += kv_block) {
        const int64_t kn = std::min(kv_block, n_kv - j0);
        Piece pieces[2];
        int np = 0;
        if (j0 < n_c) pieces[np++] = {&ctx, j0, std::min(kn, n_c - j0), 0};
        if (j0 + kn > n_c) {
          const int64_t start = std::max(j0, n_c);
          pieces[np++] = {&tgt, start - n_c, j0 + kn - start, start - j0};
        }
        int64_t n_masked = 0;  // masked key columns of this block, listed in masked_cols
        for (int p = 0; p < np; ++p) {
          const Seg<scalar_t>& s = *pieces[p].seg;
          for (int64_t r = 0; r < pieces[p].n; ++r) {
            const int64_t j = pieces[p].j + r, row = pieces[p].col + r;
            row_to_float(s.k + b * s.ksb + j * s.ksn + h * s.ksh, s.ksd, kf + row * dim, dim, 1.f);
            row_to_float(s.v + b * s.vsb + j * s.vsn + h * s.vsh, s.vsd, vf + row * dim, dim, 1.f);
            if (s.keep != nullptr && !s.keep[b * s.keep_sb + j]) masked_cols[n_masked++] = row;
          }
        }
        for (int64_t qi = 0; qi < rows; qi += q_block) {
          const int64_t qn = std::min(q_block, rows - qi);
          const float* qsub = qf + qi * dim;
          float* osub = of + qi * dim;
          // S[qn, kn] (row-major, ld kv_block) = Q_sub K_blk^T; column-major: S^T = K Q^T.
          sgemm('T', 'N', kn, qn, dim, kf, dim, qsub, dim, 0.f, sf, kv_block);
          // Online softmax over this block, row by row; P overwrites S.
          for (int64_t r = 0; r < qn; ++r) {
            float* srow = sf + r * kv_block;
            for (int64_t m = 0; m < n_masked; ++m) srow[masked_cols[m]] = neg_inf;
            float mx = neg_inf;
            int64_t d = 0;
            if (kn >= Vec::size()) {
              Vec vmx = Vec::loadu(srow);
              for (d = Vec::size(); d + Vec::size() <= kn; d += Vec::size())
                vmx = at::vec::maximum(vmx, Vec::loadu(srow + d));
              mx = at::vec::vec_reduce_all<float>(
                  [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmx);
            }
            for (; d < kn; ++d) mx = std::max(mx, srow[d]);
            const int64_t i = qi + r;
            const float m_old = mrow[i], m_new = std::max(m_old, mx);
            if (m_new == neg_inf) {  // no valid key for this row yet: P = 0, nothing to rescale
              std::fill(srow, srow + kn, 0.f);
              continue;
            }
            const Vec vm(m_new);
            Vec acc(0.f);
            for (d = 0; d + Vec::size() <= kn; d += Vec::size()) {
              Vec e = (Vec::loadu(srow + d) - vm).exp_u20();
              e.store(srow + d);
              acc = acc + e;
            }
            float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
            for (; d < kn; ++d) {
              const float e = std::exp(srow[d] - m_new);
              srow[d] = e;
              sum += e;
            }
            if (n_masked > 0) {  // exp_u20 is not defined at -inf: the masked columns are set to 0 and
              for (int64_t m = 0; m < n_masked; ++m) srow[masked_cols[m]] = 0.f;   // the sum redone
              sum = 0.f;
              for (d = 0; d < kn; ++d) sum += srow[d];
            }
            const float alpha = m_old == neg_inf ? 0.f : std::exp(m_old - m_new);
            lrow[i] = lrow[i] * alpha + sum;
            mrow[i] = m_new;
            if (alpha != 1.f && m_old != neg_inf) {
              float* orow = osub + r * dim;
              at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, orow, orow, dim);
            }
          }
          // O_sub[qn, D] += P V_blk; column-major: O^T += V^T P^T.
          sgemm('N', 'N', dim, qn, kn, vf, dim, sf, kv_block, 1.f, osub, dim);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t qi = i0 + i;
        const bool none = lrow[i] == 0.f;  // every key masked: out 0, lse -inf
        row_from_float(of + i * dim, op + ((b * n_q + qi) * heads + h) * dim, dim, none ? 0.f : 1.f / lrow[i]);
        lp[(b * heads + h) * n_q + qi] = none ? neg_inf : mrow[i] + std::log(lrow[i]);
      }
    }
  });
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> flash_route(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& ck, const Tensor& cv, bool has_ctx,
                                       double scale, const Tensor& keep_c) {
  const int64_t batch = q.size(0), n_q = q.size(1), heads = q.size(2), dim = q.size(3);
  Tensor out = at::empty({batch, n_q, heads, dim}, q.options());
  Tensor lse = at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat));
  Seg<scalar_t> tgt = make_seg<scalar_t>(k, v);
  Seg<scalar_t> ctx = has_ctx ? make_seg<scalar_t>(ck, cv) : Seg<scalar_t>{nullptr, nullptr, 0};
  if (keep_c.defined()) {  // contiguous bool [B or 1, Nc]; a batch-1 mask serves every sample
    ctx.keep = keep_c.data_ptr<bool>();
    ctx.keep_sb = keep_c.size(0) == 1 ? 0 : keep_c.stride(0);
  }
  flash_forward<scalar_t>(q, ctx, tgt, static_cast<float>(scale), choose_blocks(batch, heads, n_q, dim),
                          out, lse);
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------
// the op
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> joint_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& context_k,
                                               const std::optional<Tensor>& context_v,
                                               double scale, const std::optional<Tensor>& context_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "pfp::joint_attention: q, k, v must be 4-D [B, N, H, D]");
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
    g_last_route = "empty";
    return {at::empty({batch, n_q, heads, dim}, q.options()),
            at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat))};
  }
  Tensor ck, cv, keep_c;  // keep_c: the context mask, contiguous bool [B or 1, Nc], or undefined
  if (has_ctx) {
    ck = context_k->expand({batch, -1, -1, -1});  // batch 1 -> stride 0, no copy
    cv = context_v->expand({batch, -1, -1, -1});
  }
  if (context_mask.has_value() && has_ctx) {
    const Tensor& m = *context_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && (m.size(0) == 1 || m.size(0) == batch) &&
                    m.size(1) == context_k->size(1),
                "pfp::joint_attention: context_mask must be bool [1 or ", batch, ", ", context_k->size(1),
                "], got ", m.scalar_type(), " ", m.sizes());
    keep_c = m.contiguous();
  }
  const Route forced = static_cast<Route>(g_route.get());
  // "concat": one ATen call over [context ; target] (a copy of the keys and values); the default
  // for bf16 with both segments on an AMX CPU
  const bool concat = forced == Route::Concat ||
                      (forced == Route::Auto && q.scalar_type() == at::kBFloat16 && has_ctx && has_tgt &&
                       cpu_has_amx_bf16());
  if (concat) {
    g_last_route = "concat";
    const Tensor keep_ctx = keep_c.defined() ? keep_c.expand({batch, -1}) : Tensor();
    if (!has_ctx || !has_tgt) {  // one segment: nothing to join
      auto [out, lse] = has_ctx ? attend_segment(unit_stride_d(q), unit_stride_d(ck), unit_stride_d(cv), scale, keep_ctx)
                                : attend_segment(unit_stride_d(q), unit_stride_d(k), unit_stride_d(v), scale);
      return {out.contiguous(), lse.contiguous()};
    }
    Tensor keep_all;  // [context ; target] keys: the targets always take part
    if (keep_ctx.defined())
      keep_all = at::cat({keep_ctx, at::ones({batch, k.size(1)}, keep_ctx.options())}, 1);
    auto [out, lse] = attend_segment(unit_stride_d(q), at::cat({ck, k}, 1), at::cat({cv, v}, 1), scale, keep_all);
    return {out.contiguous(), lse.contiguous()};
  }
  bool flash = have_sgemm() && forced != Route::Segments && dim > 0;
  if (!flash) {
    TORCH_CHECK(forced != Route::Flash || dim == 0,
                "pfp::joint_attention: the 'flash' CPU route needs an SGEMM (sgemm_), which this "
                "torch build does not export");
    g_last_route = "segments";
    return segments_route(q, k, v, has_ctx ? *context_k : Tensor(), has_ctx ? *context_v : Tensor(),
                          has_ctx, has_tgt, scale, keep_c.defined() ? keep_c.expand({batch, -1}) : Tensor());
  }
  g_last_route = "flash";
  switch (q.scalar_type()) {
    case at::kFloat: return flash_route<float>(q, k, v, ck, cv, has_ctx, scale, keep_c);
    case at::kBFloat16: return flash_route<at::BFloat16>(q, k, v, ck, cv, has_ctx, scale, keep_c);
    default: return flash_route<at::Half>(q, k, v, ck, cv, has_ctx, scale, keep_c);  // checked above
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pfp, m) {
  // Testing/benchmark knobs for the CPU attention kernel: force a route ("auto", "flash",
  // "segments", "concat"; returns the previous mode) and read which route the last call on this thread ran.
  m.def("_attention_cpu_path(str mode) -> str", &set_attention_cpu_path);
  m.def("_attention_cpu_last_route() -> str", &last_attention_cpu_route);
  // The CPU ISA the loaded kernels were compiled for ("generic", "avx2", "avx512"): pip builds
  // one kernel library per ISA (setup.py) and loads one; this names it. It lives here, in a
  // kernel file, since a translation unit of its own costs a full parse of the torch headers.
  m.def("build_info() -> str", [] { return pfp::compiled_isa(); });
}

TORCH_LIBRARY_IMPL(pfp, CPU, m) { m.impl("joint_attention", &joint_attention_cpu); }

}  // namespace pfp

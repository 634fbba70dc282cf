// CPU kernels for pfp::conv3d_act, pfp::causal_conv3d_act and pfp::project_tokens.
//
// What runs (the benchmark in benchmarks/bench_conv.py decided; see the plan selection below):
//
// * oneDNN, through ATen. For fp32 the bulk of every conv is oneDNN's convolution
//   (mkldnn::_convolution_pointwise, the op torch.compile emits, with a prepacked weight), called
//   through the dispatcher, followed by ATen's vectorized in-place SiLU (faster here than oneDNN's
//   swish post-op; see onednn_conv).
//   bf16/fp16 run oneDNN's own reduced-precision conv where this CPU has one (AVX512-BF16, AMX,
//   AVX512-FP16: torch's mkldnn::_is_mkldnn_bf16_supported), with SiLU as its post-op so the
//   output is rounded once. Elsewhere (AVX2) oneDNN has none, and they are converted to fp32 once
//   (one pass over x, one over y) and run the same way: accumulation is fp32 and the result is
//   rounded once. oneDNN reads channels-last-3d activations in place (no relayout).
//
// * A direct kernel of our own (DirectConv below): implicit GEMM over channels-last input,
//   M = output positions (tiles of 6 along W), N = Cout (blocks of 2 SIMD vectors),
//   K = kt*kh*kw*Cin, at::vec FMAs into fp32 (fp64 for fp64) accumulators, fused bias + SiLU
//   epilogue, at::parallel_for over (Cout block, output row). It reads the two causal sources
//   prev and x directly: a tap whose frame is before the stream (or past the end), or whose row or
//   column falls in the zero padding, points at a row of zeros instead of being gathered or
//   padded, so no F.pad and no concatenation is ever built. It runs
//     - fp64 (oneDNN has no fp64 conv), and when oneDNN is disabled or unavailable;
//     - convs too small for oneDNN's per-call overhead (weight reorder, primitive lookup).
//
// The causal form never materialises [prev ; x] over a long chunk. Output frame m reads V[time_offset + st*m + dt]
// with V = [prev ; x]. Outputs whose window lies inside x are computed by oneDNN from x itself
// (a view), the time padding in front folded into oneDNN's padding. The at most ceil((kt-1)/st)
// outputs whose window touches prev are computed by oneDNN from a gathered window of the at most
// 2*kt-1 frames they read (bounded by the kernel size, never by the chunk or the history); under
// impl forcing the direct kernel (and for fp64) they read prev and x in place with no gather at
// all. The benchmark decided for the gathered window: the direct kernel runs these 1-2 frames
// 2-3x slower than oneDNN. Two layouts of the oneDNN part, chosen by a cost estimate:
//   aligned: oneDNN runs over all of x with symmetric time padding equal to the number of
//            virtual frames before x, so its output frame m is our output m. Batch 1 then
//            returns oneDNN's own buffer (a view of its first num_out frames; the padding at the
//            end costs ~2*(kt-1)/st wasted frames) and the boundary frames are overwritten in
//            place. No copy of input or output.
//   copied:  oneDNN computes exactly the inner outputs from the time slice of x they read (a
//            view; per batch element when B > 1 so the slice stays dense) and they are copied into
//            the output after the boundary frames: one extra pass over the output, no wasted
//            compute. Chosen for short chunks and for B > 1.
// The fresh-stream case (no prev) needs no boundary frames at all in the aligned layout.
// Short appends (<= 8 output frames after a state) instead gather [needed state frames ; chunk]
// into one window for a single oneDNN call: two primitive runs on 1-3 frames each cost 2-4x more
// than the copy (bounded by the chunk plus kt-1 frames, never by the history).
//
// Weights: what the kernels derive from a weight (the direct kernel's packed panels, oneDNN's
// blocked fp32 weight) is cached by the weight's content (a hash of its bytes, one read pass per
// call), so a streaming append does not re-derive 14 MB stage weights each time; see
// cached_from_weight. The eager baseline and the plain-weight oneDNN op reorder every call.
//
// Layouts: activations may come in any memory format; inputs whose channel stride is not 1 are
// relaid to channels-last-3d once (the only hidden copy, and it is documented in pfp_kernels/conv/).
// Outputs are always dense channels-last-3d: the strides of the fake kernels in pfp_kernels/conv/
// (up to those of size-1 dims, which address nothing).
//
// project_tokens is one GEMM: with channels-last h the [B*T*H*W, C] token matrix is a free view,
// and at::addmm_out accumulates into an output pre-filled with residual + bias (one pass), so the
// residual add is the GEMM's beta=1 epilogue. bf16/fp16 run the GEMM in fp32 (this CPU has no
// fast reduced-precision GEMM) and round once.
// Per-operator ATen headers instead of <ATen/ATen.h>: every translation unit is built once per
// CPU instruction set, and the whole-ATen header costs several seconds of each compile.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <mutex>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "pfp_common.h"

namespace pfp {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------------
// Path control, for tests and benchmarks: pfp::_conv_cpu_path("auto"|"direct"|"onednn") forces the
// kernel family, pfp::_conv_cpu_last_plan() says what the last call on this thread ran.
// ------------------------------------------------------------------------------------------------
enum class PathMode : int { Auto = 0, Direct = 1, OneDNN = 2 };
RouteSwitch<3> g_path_mode("pfp::_conv_cpu_path", {"auto", "direct", "onednn"});
thread_local std::string g_last_plan;

PathMode path_mode() { return static_cast<PathMode>(g_path_mode.get()); }

std::string set_conv_cpu_path(c10::string_view mode) { return g_path_mode.set(mode); }

std::string last_conv_cpu_plan() { return g_last_plan; }

// ------------------------------------------------------------------------------------------------
// Argument checks for direct op calls (the Python wrappers check first, with the same wording).
// ------------------------------------------------------------------------------------------------
void check_conv_inputs(const char* op, const Tensor& x, const Tensor& weight,
                       const std::optional<Tensor>& bias, at::IntArrayRef stride) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be 5-D [B, Cin, T, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 5, op, ": weight must be 5-D [Cout, Cin, kt, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1),
              " channels but weight expects Cin=", weight.size(1), " (weight shape ", weight.sizes(),
              ")");
  TORCH_CHECK(x.device().is_cpu(), op, ": the C++ kernel needs CPU tensors, x is on ", x.device());
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": x dtype must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt && weight.device() == x.device(), op,
              ": weight must match x in dtype and device; x is ", dt, " on ", x.device(),
              ", weight is ", weight.scalar_type(), " on ", weight.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt && bias->device() == x.device(), op,
                ": bias must match x in dtype and device; got ", bias->scalar_type(), " on ",
                bias->device());
  }
  TORCH_CHECK(stride.size() == 3, op, ": stride must have 3 entries (t, h, w), got ", stride);
  for (auto s : stride) TORCH_CHECK(s >= 1, op, ": stride must be >= 1 on every axis, got ", stride);
  for (int64_t d = 2; d < 5; ++d)
    TORCH_CHECK(weight.size(d) >= 1, op, ": weight kernel sizes must be >= 1, got ", weight.sizes());
}

bool parse_activation(const char* op, c10::string_view activation) {
  if (activation == "silu") return true;
  if (activation == "none") return false;
  TORCH_CHECK(false, op, ": activation must be 'silu' or 'none', got '", std::string(activation),
              "'");
}

// The conv output length along one axis: the one place this formula is written in C++ (the Python
// side's is pfp_kernels/conv/shapes.py). 0 or less when the input is too short.
constexpr int64_t conv_out_len(int64_t size, int64_t k, int64_t s, int64_t p) {
  return size + 2 * p >= k ? (size + 2 * p - k) / s + 1 : 0;
}

int64_t out_size(const char* op, int64_t size, int64_t k, int64_t s, int64_t p, const char* axis) {
  int64_t out = conv_out_len(size, k, s, p);
  TORCH_CHECK(out > 0, op, ": input ", axis, "=", size,
              " is too small for kernel ", k, " with padding ", p);
  return out;
}

// Kernels read channels contiguously (channel stride 1, any other strides). Anything else is
// relaid once to channels-last-3d.
Tensor channels_innermost(const Tensor& t) {
  if (t.size(1) == 1 || t.stride(1) == 1) return t;
  return t.contiguous(at::MemoryFormat::ChannelsLast3d);
}

Tensor empty_cl3(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast3d));
}

// ------------------------------------------------------------------------------------------------
// Weight-derived tensors (the direct kernel's packed panels, oneDNN's prepacked fp32 weight) are
// cached by the weight's *content*: re-deriving a 14 MB stage weight (a transposing copy, or
// oneDNN's reorder) on every streaming append would cost more than the append's arithmetic.
// The key is a 64-bit position-dependent hash of the weight's bytes (one parallel read pass,
// several times cheaper than a re-derivation) plus its shape, strides and dtype. Content, not
// identity: tensor identity + version counter misses writes made through `w.data` (which gets its
// own version counter) and is not available for inference tensors, so it would serve stale
// weights. Any single changed word always changes the hash (each word is multiplied by odd
// position constants, invertible mod 2^32).
// ------------------------------------------------------------------------------------------------
uint64_t content_hash(const Tensor& t) {
  Tensor c = t.contiguous();
  const auto* bytes = static_cast<const unsigned char*>(c.const_data_ptr());
  const int64_t nbytes = c.numel() * c.element_size();
  const int64_t nwords = nbytes / 4;
  constexpr int64_t kChunk = 1 << 16;
  const int64_t nchunks = (nwords + kChunk - 1) / kChunk;
  std::vector<uint64_t> partial(std::max<int64_t>(nchunks, 1), 0);
  at::parallel_for(0, nchunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      // 8 independent 32-bit lanes x 2 multipliers, so the compiler vectorizes the loop (AVX2
      // has 32-bit but no 64-bit vector multiply); each multiplier is odd, hence invertible.
      uint32_t a[8] = {0}, b[8] = {0};
      const int64_t i0 = ch * kChunk, i1 = std::min(nwords, (ch + 1) * kChunk);
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        for (int l = 0; l < 8; ++l) {
          uint32_t word;
          std::memcpy(&word, bytes + 4 * (i + l), 4);
          const uint32_t pos = static_cast<uint32_t>(i + l);
          a[l] += (word ^ 0x9E3779B9u) * (pos * 0x85EBCA6Bu | 1u);
          b[l] += (word + 0x7F4A7C15u) * ((pos * 0xC2B2AE35u + 0x27D4EB2Fu) | 1u);
        }
      }
      uint64_t h = 0;
      for (; i < i1; ++i) {
        uint32_t word;
        std::memcpy(&word, bytes + 4 * i, 4);
        h += (static_cast<uint64_t>(word) + 1) * ((static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull) | 1ull);
      }
      for (int l = 0; l < 8; ++l)
        h += (static_cast<uint64_t>(a[l]) << 32 | b[l]) * (0xFF51AFD7ED558CCDull + 2 * l);
      partial[ch] = h;
    }
  });
  uint64_t h = static_cast<uint64_t>(nbytes) * 0xD6E8FEB86659FD93ull;
  for (uint64_t p : partial) h += p;
  for (int64_t i = nwords * 4; i < nbytes; ++i) h = h * 0x100000001B3ull + bytes[i];
  return h;
}

struct WeightCacheEntry {
  std::string key;
  Tensor value;
};

std::mutex g_weight_cache_mutex;
std::vector<WeightCacheEntry> g_weight_cache;  // most recently used last
constexpr size_t kWeightCacheEntries = 32;

// Inside pfp_kernels.frozen_weights() (pfp::_conv_cpu_frozen_weights), a weight whose storage,
// shape, strides, dtype and version counter are unchanged is taken to hold the same bytes: its
// content hash is looked up instead of recomputed (reading a 14 MB stage weight per streaming
// append cost ~0.6 ms of a ~3 ms append). The caller promises what the version counter cannot
// see: no writes through `w.data` while it is frozen. Off (the default), every call hashes.
thread_local bool g_frozen_weights = false;

bool set_frozen_weights(bool frozen) {
  const bool previous = g_frozen_weights;
  g_frozen_weights = frozen;
  return previous;
}

// The storage is held by a weak reference: while the entry exists its StorageImpl's memory is not
// freed, so a new storage can never take its address (a recycled data pointer alone would collide),
// and an entry whose storage died is expired, never matched.
struct IdentityEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  std::string layout;  // offset, sizes, strides, dtype, version
  uint64_t hash;
};
std::vector<IdentityEntry> g_identity_cache;  // guarded by g_weight_cache_mutex; most recent last

uint64_t weight_hash(const Tensor& weight) {
  if (!g_frozen_weights) return content_hash(weight);
  std::ostringstream layout;
  const int64_t version = weight.is_inference() ? -1 : static_cast<int64_t>(weight._version());
  layout << weight.storage_offset() << '|' << weight.sizes() << weight.strides() << weight.scalar_type() << "|v"
         << version;
  const std::string k = layout.str();
  const c10::StorageImpl* impl = weight.storage().unsafeGetStorageImpl();
  {
    std::lock_guard<std::mutex> lock(g_weight_cache_mutex);
    for (const auto& e : g_identity_cache)
      if (!e.storage.expired() && e.storage._unsafe_get_target() == impl && e.layout == k) return e.hash;
  }
  const uint64_t h = content_hash(weight);
  std::lock_guard<std::mutex> lock(g_weight_cache_mutex);
  g_identity_cache.erase(std::remove_if(g_identity_cache.begin(), g_identity_cache.end(),
                                        [](const IdentityEntry& e) { return e.storage.expired(); }),
                         g_identity_cache.end());
  if (g_identity_cache.size() >= 2 * kWeightCacheEntries) g_identity_cache.erase(g_identity_cache.begin());
  g_identity_cache.push_back({weight.storage().getWeakStorageImpl(), k, h});
  return h;
}

template <typename Factory>
Tensor cached_from_weight(const Tensor& weight, const std::string& tag, Factory&& make) {
  std::ostringstream key;
  key << tag << '|' << weight.sizes() << weight.strides() << weight.scalar_type() << '|'
      << weight_hash(weight);
  const std::string k = key.str();
  {
    std::lock_guard<std::mutex> lock(g_weight_cache_mutex);
    for (size_t i = 0; i < g_weight_cache.size(); ++i) {
      if (g_weight_cache[i].key != k) continue;
      WeightCacheEntry hit = std::move(g_weight_cache[i]);
      g_weight_cache.erase(g_weight_cache.begin() + i);
      g_weight_cache.push_back(hit);
      return hit.value;
    }
  }
  Tensor value = make();
  std::lock_guard<std::mutex> lock(g_weight_cache_mutex);
  if (g_weight_cache.size() >= kWeightCacheEntries) g_weight_cache.erase(g_weight_cache.begin());
  g_weight_cache.push_back({k, value});
  return value;
}

// ------------------------------------------------------------------------------------------------
// Direct kernel
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kTileW = 6;          // output positions per register tile
constexpr int kVecsPerBlock = 2;   // SIMD vectors of Cout per register tile

struct Geometry {
  int64_t B, Cin, Cout, kt, kh, kw, st, sh, sw, ph, pw, H, W, Ho, Wo;
};

// A frame source: V = [prev ; x] with V indices outside [0, P + N) reading zeros.
template <typename scalar_t>
struct Source {
  const scalar_t* x = nullptr;
  int64_t xs_b = 0, xs_t = 0, xs_h = 0, xs_w = 0, N = 0;
  const scalar_t* prev = nullptr;
  int64_t ps_b = 0, ps_t = 0, ps_h = 0, ps_w = 0, P = 0;
};

// One (dt, dh) tap whose frame and row exist, for the output row being computed.
template <typename scalar_t>
struct TapRow {
  const scalar_t* row;  // element (v, hi, w=0, c=0)
  int64_t s_w;          // W stride of that source
  int64_t tap0;         // (dt*kh + dh)*kw: index of the (dt, dh, 0) tap in the packed weight
};

// Weight [Cout, Cin, kt, kh, kw] -> [ncb][kt*kh*kw][Cin][block] in the accumulation type, Cout
// zero-padded to whole blocks, so the inner loop loads one contiguous block per input channel.
Tensor pack_weight(const Tensor& weight, at::ScalarType acc, int64_t block) {
  int64_t cout = weight.size(0), cin = weight.size(1);
  int64_t taps = weight.size(2) * weight.size(3) * weight.size(4);
  int64_t ncb = (cout + block - 1) / block;
  Tensor w = weight.to(acc).permute({2, 3, 4, 1, 0}).reshape({taps * cin, cout});
  if (ncb * block != cout) w = at::constant_pad_nd(w, {0, ncb * block - cout});
  return w.view({taps * cin, ncb, block}).permute({1, 0, 2}).contiguous();
}

template <typename scalar_t>
struct DirectConv {
  using acc = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  static constexpr int64_t kBlock = kVecsPerBlock * Vec::size();

  Geometry g;
  Source<scalar_t> src;
  int64_t time_offset;  // V index read by tap dt=0 of output frame 0
  const acc* wpack;     // [ncb][K][kBlock]
  const acc* bias;      // [ncb*kBlock] or nullptr
  bool silu;
  scalar_t* y;          // output, channel stride 1
  int64_t ys_b, ys_t, ys_h, ys_w;
  const scalar_t* zeros;  // Cin zeros: the row every padded tap reads

  // Pointer to element (b, v, hi, 0, 0) of V, or nullptr where V is zero.
  const scalar_t* frame_row(int64_t b, int64_t v, int64_t hi, int64_t* s_w) const {
    if (v < 0 || v >= src.P + src.N) return nullptr;
    if (v < src.P) {
      *s_w = src.ps_w;
      return src.prev + b * src.ps_b + v * src.ps_t + hi * src.ps_h;
    }
    *s_w = src.xs_w;
    return src.x + b * src.xs_b + (v - src.P) * src.xs_t + hi * src.xs_h;
  }

  template <int MR>
  void tile(const TapRow<scalar_t>* taps, int64_t ntaps, int64_t wo0, int64_t cb,
            scalar_t* out_row) const {
    constexpr int VS = Vec::size();
    const int64_t cin = g.Cin;
    Vec acc0[MR], acc1[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc0[i] = Vec(acc(0));
      acc1[i] = Vec(acc(0));
    }
    const acc* wcb = wpack + cb * (g.kt * g.kh * g.kw * cin) * kBlock;
    for (int64_t j = 0; j < ntaps; ++j) {
      const TapRow<scalar_t>& tr = taps[j];
      for (int64_t dw = 0; dw < g.kw; ++dw) {
        const scalar_t* in[MR];
        bool any = false;
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          int64_t wi = (wo0 + i) * g.sw - g.pw + dw;
          bool ok = wi >= 0 && wi < g.W;
          in[i] = ok ? tr.row + wi * tr.s_w : zeros;
          any |= ok;
        }
        if (!any) continue;
        const acc* wp = wcb + (tr.tap0 + dw) * cin * kBlock;
        for (int64_t c = 0; c < cin; ++c) {
          Vec w0 = Vec::loadu(wp + c * kBlock);
          Vec w1 = Vec::loadu(wp + c * kBlock + VS);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) {
            Vec a(static_cast<acc>(in[i][c]));
            acc0[i] = at::vec::fmadd(a, w0, acc0[i]);
            acc1[i] = at::vec::fmadd(a, w1, acc1[i]);
          }
        }
      }
    }
    // Epilogue: bias, SiLU, round to the output dtype, store the valid channels.
    Vec b0(acc(0)), b1(acc(0));
    if (bias) {
      b0 = Vec::loadu(bias + cb * kBlock);
      b1 = Vec::loadu(bias + cb * kBlock + VS);
    }
    const int64_t c0 = cb * kBlock;
    const int64_t nvalid = std::min<int64_t>(kBlock, g.Cout - c0);
    const Vec one(acc(1));
    for (int i = 0; i < MR; ++i) {
      Vec v0 = acc0[i] + b0, v1 = acc1[i] + b1;
      if (silu) {
        v0 = v0 / (one + v0.neg().exp());
        v1 = v1 / (one + v1.neg().exp());
      }
      scalar_t* out = out_row + (wo0 + i) * ys_w + c0;
      if constexpr (std::is_same_v<scalar_t, acc>) {
        if (nvalid == kBlock) {
          v0.store(out);
          v1.store(out + VS);
          continue;
        }
      }
      alignas(64) acc buf[kBlock];
      v0.store(buf);
      v1.store(buf + VS);
      for (int64_t k = 0; k < nvalid; ++k) out[k] = static_cast<scalar_t>(buf[k]);
    }
  }

  // Computes output frames [m_begin, m_end) for every batch element.
  void run(int64_t m_begin, int64_t m_end) const {
    if (m_end <= m_begin) return;
    const int64_t ncb = (g.Cout + kBlock - 1) / kBlock;
    const int64_t frames = m_end - m_begin;
    const int64_t rows = g.B * frames * g.Ho;
    // Work item = (Cout block, output row); consecutive items share a Cout block, so the
    // block's packed weights stay in cache while a thread walks its rows.
    const int64_t work_per_row = g.Wo * kBlock * g.kt * g.kh * g.kw * g.Cin;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work_per_row));
    at::parallel_for(0, ncb * rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<TapRow<scalar_t>> taps(g.kt * g.kh);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t cb = item / rows;
        int64_t r = item % rows;
        const int64_t ho = r % g.Ho;
        r /= g.Ho;
        const int64_t m = m_begin + r % frames;
        const int64_t b = r / frames;
        int64_t ntaps = 0;
        for (int64_t dt = 0; dt < g.kt; ++dt) {
          const int64_t v = time_offset + g.st * m + dt;
          for (int64_t dh = 0; dh < g.kh; ++dh) {
            const int64_t hi = ho * g.sh - g.ph + dh;
            if (hi < 0 || hi >= g.H) continue;
            int64_t s_w = 0;
            const scalar_t* row = frame_row(b, v, hi, &s_w);
            if (!row) continue;
            taps[ntaps++] = {row, s_w, (dt * g.kh + dh) * g.kw};
          }
        }
        scalar_t* out_row = y + b * ys_b + m * ys_t + ho * ys_h;
        int64_t wo = 0;
        for (; wo + kTileW <= g.Wo; wo += kTileW) tile<kTileW>(taps.data(), ntaps, wo, cb, out_row);
        switch (g.Wo - wo) {
          case 5: tile<5>(taps.data(), ntaps, wo, cb, out_row); break;
          case 4: tile<4>(taps.data(), ntaps, wo, cb, out_row); break;
          case 3: tile<3>(taps.data(), ntaps, wo, cb, out_row); break;
          case 2: tile<2>(taps.data(), ntaps, wo, cb, out_row); break;
          case 1: tile<1>(taps.data(), ntaps, wo, cb, out_row); break;
          default: break;
        }
      }
    });
  }
};

// Runs the direct kernel for output frames [m_begin, m_end) of y. x/prev must have channel
// stride 1 (see channels_innermost); y must have channel stride 1.
void direct_conv(const Geometry& g, const Tensor& x, const std::optional<Tensor>& prev,
                 const Tensor& weight, const std::optional<Tensor>& bias, bool silu,
                 int64_t time_offset, const Tensor& y, int64_t m_begin, int64_t m_end) {
  if (m_end <= m_begin || g.B == 0 || g.Cout == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pfp_direct_conv", [&] {
    using Kernel = DirectConv<scalar_t>;
    using acc = typename Kernel::acc;
    const auto acc_type = c10::CppTypeToScalarType<acc>::value;
    Tensor wpack = cached_from_weight(weight, "direct-pack", [&] {
      return pack_weight(weight, acc_type, Kernel::kBlock);
    });
    Tensor bpack;
    if (bias) {
      int64_t padded = wpack.size(0) * Kernel::kBlock;
      bpack = at::constant_pad_nd(bias->to(acc_type), {0, padded - g.Cout}).contiguous();
    }
    std::vector<scalar_t> zeros(std::max<int64_t>(g.Cin, 1), scalar_t(0));
    Kernel k;
    k.g = g;
    k.src.x = x.const_data_ptr<scalar_t>();
    k.src.xs_b = x.stride(0);
    k.src.xs_t = x.stride(2);
    k.src.xs_h = x.stride(3);
    k.src.xs_w = x.stride(4);
    k.src.N = x.size(2);
    if (prev) {
      k.src.prev = prev->const_data_ptr<scalar_t>();
      k.src.ps_b = prev->stride(0);
      k.src.ps_t = prev->stride(2);
      k.src.ps_h = prev->stride(3);
      k.src.ps_w = prev->stride(4);
      k.src.P = prev->size(2);
    }
    k.time_offset = time_offset;
    k.wpack = wpack.const_data_ptr<acc>();
    k.bias = bias ? bpack.const_data_ptr<acc>() : nullptr;
    k.silu = silu;
    k.y = y.mutable_data_ptr<scalar_t>();
    k.ys_b = y.stride(0);
    k.ys_t = y.stride(2);
    k.ys_h = y.stride(3);
    k.ys_w = y.stride(4);
    k.zeros = zeros.data();
    k.run(m_begin, m_end);
  });
}

// ------------------------------------------------------------------------------------------------
// oneDNN, through the dispatcher
// ------------------------------------------------------------------------------------------------
bool onednn_usable() {
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// Whether oneDNN has a native conv for a reduced dtype on this CPU (AVX512-BF16 / AMX / AVX512-FP16
// class machines), asked once through torch's own mkldnn::_is_mkldnn_{bf16,fp16}_supported. Where
// it has, bf16/fp16 convs run in that dtype (fp32 accumulation, one rounding, like ours); where it
// has not, they go through fp32 once each way (eager bf16 is 25-400x slower there).
bool onednn_native(at::ScalarType dtype) {
  auto ask = [](const char* name) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    return handle.has_value() && handle->typed<bool()>().call();
  };
  static const bool bf16 = ask("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = ask("mkldnn::_is_mkldnn_fp16_supported");
  if (dtype == at::kFloat) return true;
  if (dtype == at::kBFloat16) return bf16;
  if (dtype == at::kHalf) return fp16;
  return false;
}

// act(conv(x) + b) with oneDNN's conv, then SiLU in place. x: fp32, channels-last-3d dense. Returns a new
// dense channels-last-3d fp32 tensor.
Tensor onednn_conv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                   at::IntArrayRef padding, at::IntArrayRef stride, bool silu) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
          .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const int64_t dilation[3] = {1, 1, 1};
  // In the AVX2 build an fp32 conv runs SiLU as a second, vectorized in-place pass (ATen's silu_)
  // rather than as oneDNN's swish post-op: with oneDNN's AVX2 kernels the post-op made the conv
  // 7-24% slower than conv + a separate SiLU on the four compressor stages (Zen 3, min of 40
  // interleaved runs each), and 8-33% slower on a Zen 4 run with ONEDNN_MAX_CPU_ISA=AVX2. With its
  // AVX-512 kernels the post-op is as fast or faster (Zen 4: 0.98-1.00x the separate pass's time,
  // 64->128 the 0.98), so the AVX-512 build fuses it. The extra pass streams the output once more.
  // A native bf16/fp16 conv takes SiLU as its post-op in every build: applied to the fp32
  // accumulator, so the output is rounded once (the separate pass would round twice), and it
  // measured ~12% faster on the 64->128 stage on an AVX512-BF16 CPU.
#if defined(CPU_CAPABILITY_AVX512)
  const bool post_op = silu;
#else
  const bool post_op = silu && x.scalar_type() != at::kFloat;
#endif
  // One input channel: x's channels-last strides then differ from contiguous ones only on size-1
  // dims, and oneDNN misreads some of them (e.g. x [1,1,11,5,1] with strides (55,1,5,1,1): errors
  // of 1e21 from the stock op, exact with the contiguous strides (55,55,5,1,1) of the same memory).
  const Tensor xin = x.size(1) == 1 ? x.as_strided(x.sizes(), c10::contiguous_strides(x.sizes())) : x;
  Tensor y = op.call(xin, weight, bias, padding, stride, dilation, 1, post_op ? "swish" : "none",
                     c10::List<std::optional<at::Scalar>>(), std::nullopt);
  if (silu && !post_op) at::silu_(y);
  // With one input channel oneDNN writes a contiguous output; the callers restride it as
  // channels-last.
  if (!y.is_contiguous(at::MemoryFormat::ChannelsLast3d)) y = y.contiguous(at::MemoryFormat::ChannelsLast3d);
  return y;
}

// The weight in oneDNN's blocked layout for this conv geometry (an opaque mkldnn tensor).
Tensor onednn_prepack_weight(const Tensor& w32, std::vector<int64_t> padding, at::IntArrayRef stride,
                             std::vector<int64_t> input_size) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "")
          .typed<Tensor(const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                        at::OptionalIntArrayRef)>();
  const int64_t dilation[3] = {1, 1, 1};
  return op.call(w32, padding, stride, dilation, 1, at::OptionalIntArrayRef(input_size));
}

// ------------------------------------------------------------------------------------------------
// The shared driver: outputs [0, num_out) of the conv over V = [prev ; x], in two steps.
//   plan_conv:    shapes + cost model -> a ConvPlan (which kernel, which oneDNN layout). It reads no
//                 tensor data, so pfp::_conv_cpu_plan can ask it about any shape.
//   execute_conv: runs a ConvPlan on the tensors.
// ------------------------------------------------------------------------------------------------

// The cost model's inputs. The defaults were measured with benchmarks/bench_conv.py on the
// compressor stage shapes on a 2-core AVX2 machine; pfp::_conv_cpu_costs replaces them for the
// process (e.g. with figures measured on another CPU), and the planner takes them as an argument.
struct ConvCosts {
  double onednn_flops_per_ns = 50.0;    // oneDNN's conv throughput (~50 GFLOP/s)
  double copy_ns_per_elem = 1.5;        // copying one output element
  double boundary_slowdown = 1.3;       // gathered window: copy + a second oneDNN call
  double onednn_min_flops_per_weight = 40.0;  // below this many FLOPs per weight element the
                                              // direct kernel wins (oneDNN's per-call reorder and
                                              // primitive lookup dominate tiny convs)
  double short_append_frames = 8;       // appends of at most this many outputs after a state run
                                        // as one oneDNN call over a gathered window
  // weights from this size are prepacked (and cached). With oneDNN's AVX2 kernels a small weight
  // went in plain: oneDNN's own per-call reorder picked a layout ~20% faster on the 64->128 stage
  // (Zen 3). With its AVX-512 kernels prepacking every weight measured 1-2% faster on the two
  // small stages (Zen 4) or equal (a Xeon with AMX), so the AVX-512 build prepacks them all.
#if defined(CPU_CAPABILITY_AVX512)
  double prepack_min_elements = 1;
#else
  double prepack_min_elements = 512 * 1024;
#endif
  double window_min_flops = 8e6;        // a short append runs on oneDNN only above this much of
                                        // the direct kernel's work, in FLOPs (its weight is
                                        // prepacked and cached, so what weighs
                                        // against oneDNN's higher throughput is the call's fixed
                                        // cost: the window gather, primitive lookup and SiLU pass)
};
constexpr const char* kCostNames[] = {"onednn_flops_per_ns", "copy_ns_per_elem", "boundary_slowdown",
                                      "onednn_min_flops_per_weight", "short_append_frames",
                                      "prepack_min_elements", "window_min_flops"};
constexpr size_t kNumCosts = sizeof(kCostNames) / sizeof(kCostNames[0]);
static_assert(sizeof(ConvCosts) == kNumCosts * sizeof(double), "kCostNames must list every cost");

std::mutex g_costs_mutex;
ConvCosts g_costs;

ConvCosts current_costs() {
  std::lock_guard<std::mutex> lock(g_costs_mutex);
  return g_costs;
}

// The costs of a list (kCostNames order), each checked finite and > 0; both ops below read
// costs through it, so a list one accepts the other accepts too.
ConvCosts costs_from(const char* op, at::ArrayRef<double> values) {
  std::string names;
  for (size_t i = 0; i < kNumCosts; ++i) names += std::string(i ? ", " : "") + kCostNames[i];
  TORCH_CHECK(values.size() == kNumCosts, op, ": costs must hold ", kNumCosts, " values (", names, "), got ",
              values.size());
  for (size_t i = 0; i < kNumCosts; ++i)
    TORCH_CHECK(values[i] > 0 && std::isfinite(values[i]), op, ": ", kCostNames[i],
                " must be a finite number > 0, got ", values[i]);
  ConvCosts costs;
  std::copy(values.begin(), values.end(), reinterpret_cast<double*>(&costs));
  return costs;
}

std::vector<double> costs_list(const ConvCosts& costs) {
  const auto* fields = reinterpret_cast<const double*>(&costs);
  return std::vector<double>(fields, fields + kNumCosts);
}

// pfp::_conv_cpu_costs(costs): with an empty list, returns the current costs; otherwise sets them
// (all of them, in kCostNames order) and returns the previous ones.
std::vector<double> conv_cpu_costs(at::ArrayRef<double> values) {
  std::lock_guard<std::mutex> lock(g_costs_mutex);
  std::vector<double> previous = costs_list(g_costs);
  if (!values.empty()) g_costs = costs_from("pfp::_conv_cpu_costs", values);
  return previous;
}

// The shape of one call, as the planner sees it.
struct ConvShape {
  Geometry g;
  int64_t N;            // frames of x
  int64_t P;            // frames of prev (0 without)
  int64_t M;            // outputs to compute
  int64_t time_offset;  // V index of output 0's first tap
  at::ScalarType dtype;
};

enum class Layout { Direct, Window, Aligned, Copied };

struct ConvPlan {
  Layout layout = Layout::Direct;
  bool convert = false;  // bf16/fp16 run oneDNN in fp32 (where it has no native conv for them)
  int64_t nb = 0;        // outputs [0, nb) from a gathered window (Aligned, Copied)
  // Aligned: oneDNN over x[x_skip:] with symmetric time padding pad_t gives to_full frames.
  int64_t pad_t = 0, x_skip = 0, to_full = 0;
  bool aligned_copies = false;  // its first M frames are copied out (B > 1)
  // Copied: outputs [nb, M) from x[inner_first : inner_first + inner_len], per batch element.
  int64_t inner_first = 0, inner_len = 0;

  std::string describe(int64_t M) const {
    std::ostringstream out;
    switch (layout) {
      case Layout::Direct: out << "direct[0," << M << ")"; return out.str();
      case Layout::Window: out << "onednn-window[0," << M << ")"; break;
      case Layout::Aligned:
        out << "onednn-aligned(pad_t=" << pad_t << ",frames=" << to_full << ")";
        if (aligned_copies) out << "+copy";
        if (nb) out << "+gathered[0," << nb << ")";
        break;
      case Layout::Copied:
        out << "onednn-copied[" << nb << "," << M << ")";
        if (nb) out << "+gathered[0," << nb << ")";
        break;
    }
    if (convert) out << " via fp32";
    return out.str();
  }
};

ConvPlan plan_conv(const ConvShape& s, bool onednn_available, PathMode mode, const ConvCosts& costs) {
  const Geometry& g = s.g;
  const int64_t N = s.N, P = s.P, M = s.M;
  ConvPlan plan;
  // Frames of V in front of x that output 0 sees (prev frames and stream-start zeros).
  const int64_t front = P - s.time_offset;
  // x index read by tap dt=0 of output m.
  auto x_first = [&](int64_t m) { return s.time_offset - P + g.st * m; };
  // Aligned layout: outputs that read a prev frame come from a gathered window (zeros in front
  // are oneDNN's padding). Copied layout: every output whose window starts before x does.
  const int64_t nb_aligned = (P > 0 && front > 0) ? std::min<int64_t>(M, (front + g.st - 1) / g.st) : 0;
  const int64_t nb_copied = front > 0 ? std::min<int64_t>(M, (front + g.st - 1) / g.st) : 0;

  const bool short_append = P > 0 && nb_copied > 0 && M - nb_copied <= costs.short_append_frames;
  // The window layout computes every output from one gathered window, so a short append whose
  // outputs all read state frames (M == nb, e.g. one output after a state) still runs on oneDNN;
  // the split layouts need an output whose window lies in x (M > nb_aligned).
  const bool onednn_ok = s.dtype != at::kDouble && onednn_available && N > 0 && g.ph < g.kh &&
                         g.pw < g.kw && front < g.kt && (short_append || M > nb_aligned);
  const double flops_per_frame = 2.0 * g.B * g.Ho * g.Wo * g.Cout * g.kt * g.kh * g.kw * g.Cin;
  const double weight_elems = static_cast<double>(g.Cout) * g.Cin * g.kt * g.kh * g.kw;
  bool use_onednn = onednn_ok && mode != PathMode::Direct;
  if (use_onednn && mode == PathMode::Auto) {
    // A short append's window call takes the cached prepacked weight, so no per-call reorder
    // weighs against oneDNN, only its fixed cost (~60 us). Measured with the causal op after a
    // state, frozen weights, 2 threads, on a Zen 4 (AVX-512, and as AVX2 through
    // ONEDNN_MAX_CPU_ISA): oneDNN ran about 2.5x the direct kernel's fp32 FLOP rate and won from
    // ~8 MFLOP on (256->512 on 2x6: 0.62-0.76x the direct kernel's time; 16->32 on 4x12, 4 MFLOP:
    // 1.45x), in bf16 too. The rule before (FLOPs per weight element, i.e. output positions) sent
    // every small-channel append to oneDNN (up to 2x slower) and big-weight ones to the direct kernel.
    // The direct kernel computes Cout in blocks of kVecsPerBlock SIMD vectors, so its work is
    // counted with Cout rounded up to a block (4x the FLOPs for Cout = 8 with AVX-512 vectors).
    constexpr int64_t block = kVecsPerBlock * at::vec::Vectorized<float>::size();
    const double direct_work = flops_per_frame * M * static_cast<double>((g.Cout + block - 1) / block * block) / g.Cout;
    use_onednn = short_append
                     ? direct_work > costs.window_min_flops
                     : flops_per_frame * (M - nb_aligned) > costs.onednn_min_flops_per_weight * weight_elems;
  }
  if (!use_onednn) return plan;
  plan.convert = !onednn_native(s.dtype);
  if (short_append) {
    plan.layout = Layout::Window;
    return plan;
  }

  plan.pad_t = std::max<int64_t>(front, 0);
  plan.x_skip = std::max<int64_t>(-front, 0);
  const int64_t n_aligned_in = N - plan.x_skip;
  plan.to_full = conv_out_len(n_aligned_in, g.kt, g.st, plan.pad_t);
  // Zero-copy when oneDNN's buffer, cut to M frames, is a dense channels-last tensor: B == 1, or
  // no frames to cut. Otherwise its first M frames are copied out.
  const bool aligned_ok = plan.to_full >= M && (plan.x_skip == 0 || g.B == 1);
  plan.aligned_copies = g.B > 1 && (plan.to_full != M || nb_aligned > 0);
  // Copied layout: outputs [nb_copied, M) from the x slice they read, which must lie inside x
  // (always so in the causal op; the non-causal op reads its end padding and takes the aligned one).
  plan.inner_first = x_first(nb_copied);
  const int64_t inner_end = x_first(M - 1) + g.kt;
  plan.inner_len = inner_end - plan.inner_first;
  const bool copied_ok = M > nb_copied && plan.inner_first >= 0 && inner_end <= N;
  TORCH_INTERNAL_ASSERT(aligned_ok || copied_ok, "pfp conv: no oneDNN layout for this call");

  const double frame_ns = flops_per_frame / costs.onednn_flops_per_ns;
  const double out_frame_elems = static_cast<double>(g.B) * g.Cout * g.Ho * g.Wo;
  const double cost_aligned = (plan.to_full + costs.boundary_slowdown * nb_aligned) * frame_ns +
                              (plan.aligned_copies ? out_frame_elems * M * costs.copy_ns_per_elem : 0.0);
  const double cost_copied = (M - nb_copied + costs.boundary_slowdown * nb_copied) * frame_ns +
                             out_frame_elems * (M - nb_copied) * costs.copy_ns_per_elem;
  const bool aligned = aligned_ok && (!copied_ok || cost_aligned <= cost_copied);
  plan.layout = aligned ? Layout::Aligned : Layout::Copied;
  plan.nb = aligned ? nb_aligned : nb_copied;
  return plan;
}

struct ConvCall {
  Tensor x;                    // channel stride 1
  std::optional<Tensor> prev;  // channel stride 1
  Tensor weight;
  std::optional<Tensor> bias;
  int64_t stride[3];
  int64_t ph, pw;
  bool silu;
  int64_t time_offset;
  int64_t num_out;
};

Geometry geometry_of(at::IntArrayRef x, at::IntArrayRef w, const int64_t stride[3], int64_t ph, int64_t pw) {
  Geometry g;
  g.B = x[0];
  g.Cin = x[1];
  g.Cout = w[0];
  g.kt = w[2];
  g.kh = w[3];
  g.kw = w[4];
  g.st = stride[0];
  g.sh = stride[1];
  g.sw = stride[2];
  g.ph = ph;
  g.pw = pw;
  g.H = x[3];
  g.W = x[4];
  g.Ho = conv_out_len(g.H, g.kh, g.sh, g.ph);
  g.Wo = conv_out_len(g.W, g.kw, g.sw, g.pw);
  return g;
}

ConvShape shape_of(const ConvCall& c) {
  return {geometry_of(c.x.sizes(), c.weight.sizes(), c.stride, c.ph, c.pw), c.x.size(2),
          c.prev ? c.prev->size(2) : 0, c.num_out, c.time_offset, c.x.scalar_type()};
}

Tensor execute_conv(const ConvCall& c, const ConvShape& s, const ConvPlan& plan, const ConvCosts& costs) {
  const Tensor& x = c.x;
  const auto& w = c.weight;
  const Geometry& g = s.g;
  const int64_t N = s.N, P = s.P, M = s.M;
  const auto opts = x.options();
  if (plan.layout == Layout::Direct) {
    Tensor y = empty_cl3({g.B, g.Cout, M, g.Ho, g.Wo}, opts);
    direct_conv(g, x, c.prev, w, c.bias, c.silu, c.time_offset, y, 0, M);
    return y;
  }

  // oneDNN computes in fp32; bf16/fp16 go through one conversion each way.
  const bool convert = plan.convert;
  const auto dtype = s.dtype;
  auto f32 = [&](const Tensor& t) { return convert ? t.to(at::kFloat) : t; };
  // oneDNN's blocked weight, prepacked once per weight and conv geometry (time padding, input
  // frames) instead of reordered on every call as the plain-weight op does. A weight prepacked for
  // another geometry makes oneDNN reorder it again inside the call, so each layout asks for its own.
  auto prepacked = [&](int64_t pad_t, int64_t frames, bool always = false) {
    // Below costs.prepack_min_elements (the AVX2 build: 512K; see ConvCosts) weights go in plain:
    // oneDNN's own per-call reorder of them is cheap, and on the 64 -> 128 compressor stage the
    // layout it picks that way ran ~20% faster there than the one the prepacking op picks
    // (benchmarks/bench_conv.py, interleaved, Zen 3). Large weights are prepacked.
    // A short append (`always`) computes a few frames, for which the per-call reorder is most of
    // the work: it takes the cached prepacked weight whatever its size. So does a native bf16/fp16
    // conv (AVX512-BF16 / AMX class CPUs): there oneDNN's own op with a prepacked weight beat it
    // with the plain weight by 4-15% on the bf16 64 -> 128 stage and matched or beat it on
    // 16 -> 64, in each of four interleaved runs on a Xeon with AMX (fp32 there: equal).
    // A single input channel never takes a prepacked weight: for Cin = 1 oneDNN's reorder picks a
    // layout that its conv then misreads when the W stride exceeds 1 and one output column
    // results (e.g. x [1,1,8,64,3], w [64,1,3,3,2], stride (1,1,2): errors of 1e6 and NaN), while
    // the same conv with the plain weight is right. Such weights are tiny; oneDNN's own per-call
    // reorder of them costs little.
    if (g.Cin == 1) return f32(w);
    const bool native_reduced = !convert && dtype != at::kFloat;
    if (!always && !native_reduced && static_cast<double>(w.numel()) < costs.prepack_min_elements) return f32(w);
    std::ostringstream key;
    key << "onednn-prepacked s" << g.st << "," << g.sh << "," << g.sw << " p" << pad_t << "," << g.ph
        << "," << g.pw << " in" << g.B << "," << g.Cin << "," << frames << "," << g.H << "," << g.W;
    return cached_from_weight(w, key.str(), [&] {
      return onednn_prepack_weight(f32(w), {pad_t, g.ph, g.pw}, c.stride, {g.B, g.Cin, frames, g.H, g.W});
    });
  };
  std::optional<Tensor> b32;
  if (c.bias) b32 = f32(*c.bias).contiguous();  // oneDNN reads the bias at unit stride

  // The frames of V = [zeros ; prev ; x] that outputs [0, m1) read, gathered into one dense
  // channels-last tensor: st*(m1-1)+kt frames.
  auto gather_window = [&](int64_t m1) {
    const int64_t v0 = c.time_offset, v1 = c.time_offset + g.st * (m1 - 1) + g.kt;
    std::vector<Tensor> parts;
    if (v0 < 0) parts.push_back(at::zeros({g.B, g.Cin, std::min<int64_t>(-v0, v1 - v0), g.H, g.W}, opts));
    if (P > 0 && std::max<int64_t>(v0, 0) < std::min(v1, P))
      parts.push_back(c.prev->narrow(2, std::max<int64_t>(v0, 0), std::min(v1, P) - std::max<int64_t>(v0, 0)));
    if (v1 > P) {
      const int64_t a = std::max(v0, P);
      parts.push_back(x.narrow(2, a - P, v1 - a));
    }
    return f32(at::cat(parts, 2)).contiguous(at::MemoryFormat::ChannelsLast3d);
  };
  const int64_t no_time_pad[3] = {0, g.ph, g.pw};

  if (plan.layout == Layout::Window) {
    // Short streaming appends (a few output frames after a state): one oneDNN call over the
    // gathered window of [needed state frames ; chunk] is 2-4x faster than the boundary call plus
    // the inner call (two primitive runs on 1-3 frames each, measured on the compressor stages).
    // The copy is at most kt-1 state frames plus the chunk, bounded by the chunk, never by the
    // history. Long chunks take the split layouts, which copy nothing of x.
    Tensor window = gather_window(M);
    Tensor out = onednn_conv(window, prepacked(0, window.size(2), true), b32, no_time_pad, c.stride, c.silu);
    if (convert) out = out.to(dtype);
    Tensor y = out.contiguous(at::MemoryFormat::ChannelsLast3d);
    if (y.size(0) == 1 && y.stride(0) != y.numel()) y = empty_cl3({g.B, g.Cout, M, g.Ho, g.Wo}, opts).copy_(y);
    return y;
  }

  // Outputs [0, nb) read prev frames. oneDNN computes them from a gathered window of the at most
  // st*(nb-1)+kt <= 2*kt-1 frames of V they read (bounded by the kernel, not the chunk); the direct
  // kernel, which reads prev and x in place, is ~2-3x slower per frame than oneDNN here.
  auto boundary = [&](const Tensor& y, int64_t nb) {
    if (!nb) return;
    Tensor window = gather_window(nb);
    y.narrow(2, 0, nb).copy_(onednn_conv(window, prepacked(0, window.size(2)), b32, no_time_pad, c.stride, c.silu));
  };

  Tensor y;
  if (plan.layout == Layout::Aligned) {
    // oneDNN over x (from the first frame any output reads) with symmetric time padding, so that
    // its output frame m is our output frame m.
    Tensor xs = plan.x_skip ? x.narrow(2, plan.x_skip, N - plan.x_skip) : x;
    xs = f32(xs).contiguous(at::MemoryFormat::ChannelsLast3d);  // no-op: dense CL3 fp32
    const int64_t padding[3] = {plan.pad_t, g.ph, g.pw};
    Tensor full = onednn_conv(xs, prepacked(plan.pad_t, xs.size(2)), b32, padding, c.stride, c.silu);
    if (convert) full = full.to(dtype);
    if (plan.to_full == M) {
      y = full;
    } else if (g.B == 1) {
      // The first M frames of a batch-1 channels-last buffer are a dense channels-last tensor;
      // restride the size-1 batch dim so the strides equal a fresh tensor's.
      const int64_t cs = g.Cout * g.Ho * g.Wo;
      y = full.as_strided({1, g.Cout, M, g.Ho, g.Wo}, {M * cs, 1, cs, g.Wo * g.Cout, g.Cout});
    } else {
      y = empty_cl3({g.B, g.Cout, M, g.Ho, g.Wo}, opts);
      y.copy_(full.narrow(2, 0, M));
    }
    boundary(y, plan.nb);
    return y;
  }

  y = empty_cl3({g.B, g.Cout, M, g.Ho, g.Wo}, opts);
  boundary(y, plan.nb);
  for (int64_t b = 0; b < g.B; ++b) {
    // One batch element's time slice of a channels-last tensor is dense: no input copy.
    Tensor xb = f32(x.narrow(0, b, 1).narrow(2, plan.inner_first, plan.inner_len))
                    .contiguous(at::MemoryFormat::ChannelsLast3d);
    Tensor yb = onednn_conv(xb, prepacked(0, plan.inner_len), b32, no_time_pad, c.stride, c.silu);
    y.narrow(0, b, 1).narrow(2, plan.nb, M - plan.nb).copy_(yb);
  }
  return y;
}

Tensor run_conv(const ConvCall& c) {
  const ConvShape shape = shape_of(c);
  const ConvCosts costs = current_costs();
  const ConvPlan plan = plan_conv(shape, onednn_usable(), path_mode(), costs);
  Tensor y = execute_conv(c, shape, plan, costs);
  g_last_plan = plan.describe(shape.M);
  return y;
}

// pfp::_conv_cpu_plan: the plan auto would run for a call of this shape under the current costs
// (or the given ones), without running it, e.g. to see where a calibration moves the choices.
std::string conv_cpu_plan(at::IntArrayRef x_shape, int64_t prev_frames, at::IntArrayRef weight_shape,
                          at::IntArrayRef stride, at::IntArrayRef padding_hw, int64_t time_offset,
                          int64_t num_out, at::ScalarType dtype, at::ArrayRef<double> costs) {
  const char* op = "pfp::_conv_cpu_plan";
  TORCH_CHECK(x_shape.size() == 5 && weight_shape.size() == 5 && stride.size() == 3 && padding_hw.size() == 2,
              op, ": x_shape and weight_shape need 5 entries, stride 3 and padding_hw 2");
  TORCH_CHECK(prev_frames >= 0 && num_out >= 1, op, ": prev_frames must be >= 0 and num_out >= 1");
  const ConvCosts given = costs.empty() ? current_costs() : costs_from(op, costs);
  const int64_t st[3] = {stride[0], stride[1], stride[2]};
  ConvShape s{geometry_of(x_shape, weight_shape, st, padding_hw[0], padding_hw[1]), x_shape[2], prev_frames,
              num_out, time_offset, dtype};
  return plan_conv(s, onednn_usable(), path_mode(), given).describe(num_out);
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------
Tensor conv3d_act_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view activation) {
  const char* op = "pfp::conv3d_act";
  check_conv_inputs(op, x, weight, bias, stride);
  TORCH_CHECK(padding.size() == 3, op, ": padding must have 3 entries (t, h, w), got ", padding);
  for (auto p : padding) TORCH_CHECK(p >= 0, op, ": padding must be >= 0 on every axis, got ", padding);
  const bool silu = parse_activation(op, activation);
  TORCH_CHECK(x.size(2) > 0, op, ": x has an empty time dimension (T=0); a non-causal conv needs T >= 1");
  const int64_t to = out_size(op, x.size(2), weight.size(2), stride[0], padding[0], "T");
  out_size(op, x.size(3), weight.size(3), stride[1], padding[1], "H");
  out_size(op, x.size(4), weight.size(4), stride[2], padding[2], "W");
  ConvCall c{channels_innermost(x), std::nullopt, weight, bias,
             {stride[0], stride[1], stride[2]}, padding[1], padding[2], silu,
             /*time_offset=*/-padding[0], /*num_out=*/to};
  return run_conv(c);
}

Tensor causal_conv3d_act_cpu(const Tensor& x, const std::optional<Tensor>& prev, const Tensor& weight,
                             const std::optional<Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding_hw, c10::string_view activation,
                             int64_t time_offset, int64_t num_out) {
  const char* op = "pfp::causal_conv3d_act";
  check_conv_inputs(op, x, weight, bias, stride);
  TORCH_CHECK(padding_hw.size() == 2, op, ": padding_hw must have 2 entries (h, w), got ", padding_hw);
  for (auto p : padding_hw)
    TORCH_CHECK(p >= 0, op, ": padding_hw must be >= 0 on every axis, got ", padding_hw);
  const bool silu = parse_activation(op, activation);
  const int64_t ho = out_size(op, x.size(3), weight.size(3), stride[1], padding_hw[0], "H");
  const int64_t wo = out_size(op, x.size(4), weight.size(4), stride[2], padding_hw[1], "W");
  TORCH_CHECK(num_out >= 0, op, ": num_out must be >= 0, got ", num_out);
  int64_t p = 0;
  if (prev) {
    TORCH_CHECK(prev->dim() == 5, op, ": prev must be 5-D [B, Cin, P, H, W], got shape ", prev->sizes());
    TORCH_CHECK(prev->size(0) == x.size(0) && prev->size(1) == x.size(1) && prev->size(3) == x.size(3) &&
                    prev->size(4) == x.size(4),
                op, ": prev must match x in batch, channels, H and W; prev is ", prev->sizes(),
                ", x is ", x.sizes());
    TORCH_CHECK(prev->scalar_type() == x.scalar_type() && prev->device() == x.device(), op,
                ": prev must match x in dtype and device; x is ", x.scalar_type(), " on ", x.device(),
                ", prev is ", prev->scalar_type(), " on ", prev->device());
    p = prev->size(2);
  }
  const int64_t kt = weight.size(2);
  if (num_out > 0) {
    const int64_t last = time_offset + stride[0] * (num_out - 1) + kt;
    TORCH_CHECK(last <= p + x.size(2), op, ": time_offset=", time_offset, " and num_out=", num_out,
                " read frame ", last - 1, " of V = [prev ; x], which has only ", p + x.size(2),
                " frames (prev ", p, ", x ", x.size(2), ")");
  }
  if (num_out == 0) {
    g_last_plan = "empty";
    return empty_cl3({x.size(0), weight.size(0), 0, ho, wo}, x.options());
  }
  std::optional<Tensor> prev_c;
  if (prev && prev->size(2) > 0) prev_c = channels_innermost(*prev);
  ConvCall c{channels_innermost(x), prev_c, weight, bias,
             {stride[0], stride[1], stride[2]}, padding_hw[0], padding_hw[1], silu,
             time_offset, num_out};
  return run_conv(c);
}

Tensor project_tokens_cpu(const Tensor& h, const Tensor& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& residual) {
  const char* op = "pfp::project_tokens";
  TORCH_CHECK(h.dim() == 5, op, ": h must be 5-D [B, C, T, H, W], got shape ", h.sizes());
  TORCH_CHECK(h.device().is_cpu(), op, ": the C++ kernel needs CPU tensors, h is on ", h.device());
  auto dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": h dtype must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h.size(1), op, ": weight must be [Cout, C=",
              h.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dt && weight.device() == h.device(), op,
              ": weight must match h in dtype and device; h is ", dt, ", weight is ", weight.scalar_type());
  const int64_t B = h.size(0), C = h.size(1), cout = weight.size(0);
  const int64_t ntok = h.size(2) * h.size(3) * h.size(4);
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->scalar_type() == dt &&
                    bias->device() == h.device(),
                op, ": bias must be [", cout, "] with h's dtype and device, got ", bias->sizes(), " ",
                bias->scalar_type());
  if (residual)
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == B && residual->size(1) == ntok &&
                    residual->size(2) == cout && residual->scalar_type() == dt &&
                    residual->device() == h.device(),
                op, ": residual must be [", B, ", ", ntok, ", ", cout, "] with h's dtype and device, got ",
                residual->sizes(), " ", residual->scalar_type());

  const bool reduced = dt == at::kHalf || dt == at::kBFloat16;
  const auto gemm_type = reduced ? at::kFloat : dt;
  // [B, C, T, H, W] -> [B*T*H*W, C]: a view when h is channels-last-3d, else one relayout.
  Tensor tokens = h.permute({0, 2, 3, 4, 1}).reshape({B * ntok, C});
  if (reduced) tokens = tokens.to(gemm_type);
  Tensor wt = weight.to(gemm_type).t();
  Tensor out2d;
  const bool direct_out = !reduced;  // fp32/fp64: GEMM writes the returned tensor itself
  if (residual) {
    // Pre-fill with residual (+ bias) in one pass; the GEMM accumulates into it (beta = 1).
    Tensor r = residual->reshape({B * ntok, cout});
    out2d = bias ? at::add(r.to(gemm_type), bias->to(gemm_type)) : r.to(gemm_type, false, /*copy=*/true);
    out2d = out2d.contiguous();
    at::addmm_out(out2d, out2d, tokens, wt);
  } else if (bias) {
    out2d = at::addmm(bias->to(gemm_type), tokens, wt);
  } else {
    out2d = at::mm(tokens, wt);
  }
  Tensor out = out2d.view({B, ntok, cout});
  if (!direct_out) out = out.to(dt);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pfp, m) {
  // Testing/benchmark knobs for the CPU conv kernels: force a kernel family ("auto", "direct",
  // "onednn"; returns the previous mode) and read which plan the last call on this thread ran.
  m.def("_conv_cpu_path(str mode) -> str", &set_conv_cpu_path);
  // pfp_kernels.frozen_weights(): on this thread, weights whose storage and version are unchanged
  // keep their content hash (returns the previous setting)
  m.def("_conv_cpu_frozen_weights(bool frozen) -> bool", &set_frozen_weights);
  m.def("_conv_cpu_last_plan() -> str", &last_conv_cpu_plan);
  // The cost model's inputs (see ConvCosts): [] reads them, a full list sets them (returns the old).
  m.def("_conv_cpu_costs(float[] costs) -> float[]", &conv_cpu_costs);
  m.def("_conv_cpu_plan(int[] x_shape, int prev_frames, int[] weight_shape, int[] stride, int[] padding_hw, "
        "int time_offset, int num_out, ScalarType dtype, float[] costs) -> str", &conv_cpu_plan);
}

TORCH_LIBRARY_IMPL(pfp, CPU, m) {
  m.impl("conv3d_act", &conv3d_act_cpu);
  m.impl("causal_conv3d_act", &causal_conv3d_act_cpu);
  m.impl("project_tokens", &project_tokens_cpu);
}

}  // namespace pfp

// C++ test of the pfp op library: loads libpfp_ops like a libtorch user and checks each op's CPU
// kernel against ATen reference math. Exits non-zero on the first mismatch.
#include <cmath>
#include <dlfcn.h>
#include <torch/torch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

static int failures = 0;

#define EXPECT(cond, msg)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      std::fprintf(stderr, "FAILED: %s (%s)\n", msg, #cond); \
      ++failures;                                           \
    }                                                       \
  } while (0)

static c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

static void test_build_info() {
  auto handle = op("pfp::build_info");
  auto fn = handle.typed<std::string()>();
  std::string isa = fn.call();
  EXPECT(isa == "generic" || isa == "avx2" || isa == "avx512", "build_info names an ISA");
  std::printf("build_info: %s\n", isa.c_str());
}

// y = act(conv3d(x) + b) in ATen math, computed in double.
static at::Tensor conv_ref(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool silu) {
  auto y = at::conv3d(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), stride, padding);
  return silu ? at::silu(y) : y;
}

static double rel_err(const at::Tensor& got, const at::Tensor& ref) {
  double scale = std::max(1.0, ref.abs().max().item<double>());
  return (got.to(at::kDouble) - ref).abs().max().item<double>() / scale;
}

static double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 4e-3;
    default: return 3e-2;  // bfloat16
  }
}

static void set_path(const char* mode) {
  op("pfp::_conv_cpu_path").typed<std::string(c10::string_view)>().call(mode);
}

static void test_conv3d_act() {
  auto conv = op("pfp::conv3d_act").typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, at::IntArrayRef,
                                                     at::IntArrayRef, c10::string_view)>();
  for (const char* mode : {"direct", "onednn", "auto"}) {
    set_path(mode);
    for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
      auto x = at::randn({2, 5, 7, 9, 11}).to(dtype).contiguous(at::MemoryFormat::ChannelsLast3d);
      auto w = (at::randn({19, 5, 3, 3, 3}) * 0.15).to(dtype);
      auto b = at::randn({19}).to(dtype);
      for (bool silu : {true, false}) {
        auto y = conv.call(x, w, b, {2, 1, 2}, {1, 1, 0}, silu ? "silu" : "none");
        auto ref = conv_ref(x, w, b, {2, 1, 2}, {1, 1, 0}, silu);
        double err = rel_err(y, ref);
        std::printf("conv3d_act %-6s %-10s silu=%d err %.2e\n", mode, c10::toString(dtype), silu, err);
        EXPECT(y.sizes() == ref.sizes(), "conv3d_act shape");
        EXPECT(y.scalar_type() == dtype, "conv3d_act dtype");
        EXPECT(y.is_contiguous(at::MemoryFormat::ChannelsLast3d), "conv3d_act writes channels-last-3d");
        EXPECT(err <= tolerance(dtype), "conv3d_act matches ATen");
      }
    }
  }
  set_path("auto");
}

static void test_causal_conv3d_act() {
  auto causal = op("pfp::causal_conv3d_act")
                    .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                      c10::string_view, int64_t, int64_t)>();
  for (const char* mode : {"direct", "onednn"}) {
    set_path(mode);
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto x = at::randn({1, 6, 10, 5, 7}).to(dtype).contiguous(at::MemoryFormat::ChannelsLast3d);
      auto prev = at::randn({1, 6, 2, 5, 7}).to(dtype);
      auto w = (at::randn({16, 6, 3, 3, 3}) * 0.15).to(dtype);
      auto b = at::randn({16}).to(dtype);
      // V = [zeros(1) ; prev ; x]; time_offset -1 reads one zero frame first.
      auto v = at::cat({at::zeros({1, 6, 1, 5, 7}, x.options()), prev, x}, 2);
      for (int64_t st : {1, 2}) {
        int64_t num_out = (13 - 3) / st + 1;
        auto y = causal.call(x, prev, w, b, {st, 1, 1}, {1, 1}, "silu", -1, num_out);
        auto ref = conv_ref(v, w, b, {st, 1, 1}, {0, 1, 1}, true);
        double err = rel_err(y, ref);
        std::printf("causal_conv3d_act %-6s %-10s st=%ld err %.2e\n", mode, c10::toString(dtype), (long)st, err);
        EXPECT(y.sizes() == ref.sizes(), "causal_conv3d_act shape");
        EXPECT(y.is_contiguous(at::MemoryFormat::ChannelsLast3d), "causal_conv3d_act writes channels-last-3d");
        EXPECT(err <= tolerance(dtype), "causal_conv3d_act matches ATen");
      }
    }
  }
  set_path("auto");
}

static void test_project_tokens() {
  auto proj = op("pfp::project_tokens")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                    const std::optional<at::Tensor>&)>();
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (bool cl : {true, false}) {
      auto h = at::randn({2, 16, 3, 4, 5}).to(dtype);
      if (cl) h = h.contiguous(at::MemoryFormat::ChannelsLast3d);
      auto w = (at::randn({24, 16}) * 0.25).to(dtype);
      auto b = at::randn({24}).to(dtype);
      auto r = at::randn({2, 60, 24}).to(dtype);
      auto y = proj.call(h, w, b, r);
      auto hd = h.to(at::kDouble).permute({0, 2, 3, 4, 1}).reshape({2, 60, 16});
      auto ref = at::linear(hd, w.to(at::kDouble), b.to(at::kDouble)) + r.to(at::kDouble);
      double err = rel_err(y, ref);
      std::printf("project_tokens %-10s cl=%d err %.2e\n", c10::toString(dtype), cl, err);
      EXPECT(y.sizes() == ref.sizes(), "project_tokens shape");
      EXPECT(err <= tolerance(dtype), "project_tokens matches ATen");
    }
  }
}

// joint_attention against SDPA over the concatenation in double, both CPU routes; lengths past
// the flash route's blocks (128 queries x 256 keys), a block straddling context and target, a
// batch-1 context served to two query batches; without and with a context key mask (one sample's
// first 260 context keys masked, so its first key block holds none).
static void test_joint_attention() {
  using Out = std::tuple<at::Tensor, at::Tensor>;
  auto attn = op("pfp::joint_attention")
                  .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                             const std::optional<at::Tensor>&)>();
  auto set_route = op("pfp::_attention_cpu_path").typed<std::string(c10::string_view)>();
  auto last_route = op("pfp::_attention_cpu_last_route").typed<std::string()>();
  const double scale = 0.3;
  for (const char* route : {"flash", "segments"}) {
    set_route.call(route);
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
     for (bool masked : {false, true}) {
      auto q = at::randn({2, 150, 3, 32}).to(dtype);
      auto k = at::randn({2, 70, 3, 32}).to(dtype), v = at::randn({2, 70, 3, 32}).to(dtype);
      auto ck = at::randn({1, 300, 3, 32}).to(dtype), cv = at::randn({1, 300, 3, 32}).to(dtype);
      std::optional<at::Tensor> mask;
      if (masked) {
        mask = at::ones({2, 300}, at::kBool);
        mask->select(0, 1).slice(0, 0, 260).fill_(false);
      }
      auto [out, lse] = attn.call(q, k, v, ck, cv, scale, mask);
      EXPECT(last_route.call() == route, "joint_attention ran the forced route");
      auto d = [](const at::Tensor& t) { return t.to(at::kDouble).transpose(1, 2); };
      auto kk = at::cat({d(ck).expand({2, -1, -1, -1}), d(k)}, 2);
      auto vv = at::cat({d(cv).expand({2, -1, -1, -1}), d(v)}, 2);
      auto s = at::matmul(d(q), kk.transpose(-1, -2)) * scale;
      if (masked) {
        auto keep = at::cat({*mask, at::ones({2, 70}, at::kBool)}, 1).view({2, 1, 1, 370});
        s = s.masked_fill(keep.logical_not(), -INFINITY);
      }
      auto ref = at::matmul(at::softmax(s, -1), vv).transpose(1, 2);
      auto ref_lse = at::logsumexp(s, -1);
      double err = rel_err(out, ref), lse_err = rel_err(lse, ref_lse);
      std::printf("joint_attention %-8s %-10s %-6s err %.2e lse err %.2e\n", route, c10::toString(dtype),
                  masked ? "masked" : "", err, lse_err);
      EXPECT(out.sizes() == q.sizes() && out.scalar_type() == dtype, "joint_attention out shape");
      EXPECT(err <= tolerance(dtype), "joint_attention matches SDPA over the concatenation");
      EXPECT(lse_err <= 1e-4, "joint_attention lse");
     }
    }
  }
  set_route.call("auto");
}

static void test_bad_input_names_argument() {
  auto conv = op("pfp::conv3d_act").typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, at::IntArrayRef,
                                                     at::IntArrayRef, c10::string_view)>();
  auto x = at::randn({1, 4, 3, 5, 5});
  auto w = at::randn({8, 3, 3, 3, 3});
  bool threw = false;
  try {
    conv.call(x, w, std::nullopt, {1, 1, 1}, {0, 0, 0}, "silu");
  } catch (const c10::Error& e) {
    threw = std::string(e.what_without_backtrace()).find("Cin=3") != std::string::npos;
  }
  EXPECT(threw, "channel mismatch is reported with the weight's Cin");
}

int main() {
  if (!dlopen(PFP_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", PFP_OPS_LIBRARY, dlerror());
    return 1;
  }
  test_build_info();
  at::manual_seed(0);
  test_conv3d_act();
  test_causal_conv3d_act();
  test_project_tokens();
  test_joint_attention();
  test_bad_input_names_argument();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ op checks passed\n");
  return 0;
}

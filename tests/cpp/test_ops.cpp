// C++ test of the pfp op library: loads libpfp_ops like a libtorch user and checks each op's CPU
// kernel against ATen reference math. Exits non-zero on the first mismatch.
#include <dlfcn.h>
#include <torch/torch.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

int main() {
  if (!dlopen(PFP_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", PFP_OPS_LIBRARY, dlerror());
    return 1;
  }
  test_build_info();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ op checks passed\n");
  return 0;
}

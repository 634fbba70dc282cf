#pragma once
#include <array>
#include <atomic>
#include <string>

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

namespace pfp {

inline std::string compiled_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// A process-wide switch that forces one of a CPU op's kernel families, for tests and benchmarks.
// Mode 0 is "auto" (the op chooses); set() returns the previous mode's name and rejects an unknown
// one with a message that lists the choices.
template <size_t N>
class RouteSwitch {
 public:
  RouteSwitch(const char* op, std::array<const char*, N> names) : op_(op), names_(names) {}

  std::string set(c10::string_view mode) {
    std::string previous = names_[mode_.load()];
    for (size_t i = 0; i < N; ++i) {
      if (mode == names_[i]) {
        mode_.store(static_cast<int>(i));
        return previous;
      }
    }
    std::string choices;
    for (size_t i = 0; i < N; ++i) choices += std::string(i ? ", '" : "'") + names_[i] + "'";
    TORCH_CHECK(false, op_, ": mode must be one of ", choices, "; got '", std::string(mode), "'");
  }

  int get() const { return mode_.load(); }

 private:
  const char* op_;
  std::array<const char*, N> names_;
  std::atomic<int> mode_{0};
};

}  // namespace pfp

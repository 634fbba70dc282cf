#pragma once
#include <string>

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

}  // namespace pfp

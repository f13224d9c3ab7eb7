// Runtime ISA dispatch: the AVX2 table when the CPU has AVX2+FMA+F16C and the reference is not
// forced (HYBRIDINFER_FORCE_REF=1 at import, or force_reference(true) at any time).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace hi {

bool cpu_has_avx2() {
#if defined(HI_HAVE_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool env_forces_ref() {
  const char* v = std::getenv("HYBRIDINFER_FORCE_REF");
  return v && *v && std::strcmp(v, "0") != 0;
}

static std::atomic<bool> g_force_ref{env_forces_ref()};

void force_reference(bool on) { g_force_ref.store(on); }
bool reference_forced() { return g_force_ref.load(); }

const Kernels& active_kernels() {
  static const Kernels* fast = cpu_has_avx2() ? avx2_kernels() : nullptr;
  if (fast && !g_force_ref.load(std::memory_order_relaxed)) return *fast;
  return ref_kernels();
}

#if !defined(HI_HAVE_X86)
const Kernels* avx2_kernels() { return nullptr; }
#endif

}  // namespace hi

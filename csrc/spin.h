// cpu_relax(): the pause of a spin-wait loop (x86 PAUSE; elsewhere a yield).
#pragma once
#include <thread>
#if defined(HI_HAVE_X86)
#include <immintrin.h>
#endif

namespace hi {

inline void cpu_relax() {
#if defined(HI_HAVE_X86)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace hi

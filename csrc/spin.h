// cpu_relax(): the pause of a spin-wait loop (x86 PAUSE; elsewhere a yield).
// spin_until(done): wait for another thread's progress expected within microseconds: pause
// 4096 times, then yield the core on every check (an oversubscribed machine must not starve
// the thread being waited for).
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

template <class Done>
inline void spin_until(const Done& done) {
  for (int i = 0; !done(); ++i) {
    if (i < 4096) cpu_relax(); else std::this_thread::yield();
  }
}

}  // namespace hi

// x in the layouts the kernels read (xprep.h). The buffers are process-wide and reused across
// calls: the callers hold pool_lock() (threadpool.h) from prepare_x until the kernels are done.
#include "xprep.h"

#include <cstring>
#include <vector>

namespace hi {
namespace {

std::vector<BlockQ8X> g_xq;       // x quantised to q8 [b, d/32]
std::vector<XPairQ8> g_xpair;     // the same, paired for the AVX2 kernel [b, d/64]
std::vector<int8_t> g_xg;         // the same, regrouped for Q4_0G rows [b, d/256, 256]
std::vector<float> g_xd;          // block scales [b, d/32]
std::vector<int32_t> g_xs8;       // 8 * block sums [b, d/32]
std::vector<int8_t> g_xh;         // one token's blocks in pairs for GGUF q4_0 dot2 [d/64, 64]
std::vector<float> g_xdo;         // its scales per group of 8 in lane order 0 2 4 6 1 3 5 7
std::vector<int32_t> g_xs8o;      // its 8 * sums, same order

}  // namespace

XPrep prepare_x(const Kernels& K, const float* x, int b, int d, bool need_q8, bool grouped,
                bool pairs) {
  XPrep xp;
  xp.xf = x; xp.b = b; xp.d = d;
  if (need_q8) {
    g_xq.resize(size_t(b) * (d / QK));
    for (int t = 0; t < b; ++t) K.quantize_q8(x + size_t(t) * d, d, g_xq.data() + size_t(t) * (d / QK));
    xp.xq = g_xq.data();
    const int nb = d / QK, np = nb / 2;
    g_xpair.resize(size_t(b) * np);
    for (int t = 0; t < b; ++t)
      for (int j = 0; j < np; ++j) {
        const BlockQ8X& a = g_xq[size_t(t) * nb + 2 * j];
        const BlockQ8X& c = g_xq[size_t(t) * nb + 2 * j + 1];
        XPairQ8& p = g_xpair[size_t(t) * np + j];
        for (int l = 0; l < 8; ++l) { p.d[l] = (l & 2) ? c.d : a.d; p.sum8[l] = 0; }
        p.sum8[0] = a.sum8;
        p.sum8[2] = c.sum8;
      }
    xp.xpair = g_xpair.data();
    if (grouped) {
      const int ng = nb / kGroupBlocks;
      g_xg.resize(size_t(b) * ng * kGroupXBytes);
      g_xd.resize(size_t(b) * nb);
      g_xs8.resize(size_t(b) * nb);
      for (size_t i = 0; i < size_t(b) * nb; ++i) { g_xd[i] = g_xq[i].d; g_xs8[i] = g_xq[i].sum8; }
      for (int t = 0; t < b; ++t)
        for (int g = 0; g < ng; ++g) {
          int8_t* o = g_xg.data() + (size_t(t) * ng + g) * kGroupXBytes;
          const BlockQ8X* q = g_xq.data() + size_t(t) * nb + size_t(g) * kGroupBlocks;
          for (int v = 0; v < 4; ++v)
            for (int k = 0; k < kGroupBlocks; ++k) {
              std::memcpy(o + 64 * v + 4 * k, q[k].q + 4 * v, 4);            // values 4v..4v+3
              std::memcpy(o + 64 * v + 32 + 4 * k, q[k].q + 16 + 4 * v, 4);  // values 16+4v..
            }
        }
      xp.xg = g_xg.data();
      xp.xd = g_xd.data();
      xp.xs8 = g_xs8.data();
    }
    if (pairs && b == 1) {
      g_xh.resize(size_t(np) * 64);
      for (int p = 0; p < np; ++p) {
        int8_t* o = g_xh.data() + size_t(p) * 64;
        std::memcpy(o, g_xq[2 * p].q, 16);
        std::memcpy(o + 16, g_xq[2 * p + 1].q, 16);
        std::memcpy(o + 32, g_xq[2 * p].q + 16, 16);
        std::memcpy(o + 48, g_xq[2 * p + 1].q + 16, 16);
      }
      const int ng = nb / kGroupBlocks;
      g_xdo.resize(size_t(ng) * kGroupBlocks);
      g_xs8o.resize(size_t(ng) * kGroupBlocks);
      static constexpr int order[kGroupBlocks] = {0, 2, 4, 6, 1, 3, 5, 7};
      for (int g = 0; g < ng; ++g)
        for (int l = 0; l < kGroupBlocks; ++l) {
          g_xdo[size_t(g) * kGroupBlocks + l] = g_xq[size_t(g) * kGroupBlocks + order[l]].d;
          g_xs8o[size_t(g) * kGroupBlocks + l] = g_xq[size_t(g) * kGroupBlocks + order[l]].sum8;
        }
      xp.xh = g_xh.data();
      xp.xdo = g_xdo.data();
      xp.xs8o = g_xs8o.data();
    }
  }
  return xp;
}

}  // namespace hi

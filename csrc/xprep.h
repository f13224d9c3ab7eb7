// The activation x of one call in the layouts the kernels read (kernels.h XPrep), prepared once
// per call by the drivers (ffn.cpp) before the rows are handed to the kernels.
// ISA-independent: the quantisation itself is the active table's quantize_q8.
#pragma once
#include "kernels.h"

namespace hi {

// x [b, d] f32 -> XPrep (xf = x; the other pointers into process-wide buffers reused by the next
// call: the caller holds pool_lock() until the kernels are done with them).
// need_q8: quantise x once per call when any FFN uses integer dot products (xq, xpair).
// grouped: also the Q4_0G layout of the quantised x (kernels.h XPrep::xg); pairs: (one token)
// the block pairs and lane-ordered scales of GGUF q4_0's dot2 (XPrep::xh).
XPrep prepare_x(const Kernels& K, const float* x, int b, int d, bool need_q8, bool grouped = false,
                bool pairs = false);

}  // namespace hi

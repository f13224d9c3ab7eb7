// Thin pybind11 bindings: the kernels themselves live in the other csrc files.
#include <pybind11/pybind11.h>

namespace py = pybind11;

static const char* isa_name() {
#if defined(HI_HAVE_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "scalar";
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridinfer native kernels";
  m.def("isa", &isa_name, "The instruction set the dispatcher picked ('avx2' or 'scalar').");
}

// Thin pybind11 bindings: the kernels themselves live in the other csrc files.
// Buffers arrive as raw data pointers (ints) plus sizes; hybridinfer/kernels/cpu.py checks
// dtype, contiguity and shapes before calling. Ids are validated here (range, duplicates) and
// rejected with ValueError. The GIL is released for the whole native call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "cold_chain.h"
#include "cold_step.h"
#include "ffn.h"
#include "kernels.h"
#include "threadpool.h"

namespace py = pybind11;
using hi::FFNDesc;

namespace {

template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

FFNDesc desc(int fmt, int d, int n_ff, uintptr_t gate, uintptr_t up, uintptr_t down) {
  return FFNDesc{hi::Fmt(fmt), d, n_ff, ptr<const uint8_t>(gate), ptr<const uint8_t>(up),
                 ptr<const uint8_t>(down)};
}

// One call over E FFNs sharing x: y [b, d] = sum_e scales[e, :] * FFN_e(x)[ids_e].
void ffn_sparse_multi(const std::vector<int>& fmts, int d, const std::vector<int>& n_ffs,
                      const std::vector<uintptr_t>& gates, const std::vector<uintptr_t>& ups,
                      const std::vector<uintptr_t>& downs, uintptr_t x, int b,
                      const std::vector<uintptr_t>& ids, const std::vector<int64_t>& ks,
                      uintptr_t scales, int act, float threshold, bool exact, uintptr_t y) {
  const size_t E = fmts.size();
  if (n_ffs.size() != E || gates.size() != E || ups.size() != E || downs.size() != E ||
      ids.size() != E || ks.size() != E)
    throw py::value_error("ffn_sparse_multi: per-FFN lists differ in length");
  std::vector<FFNDesc> f;
  std::vector<const int32_t*> idp;
  for (size_t e = 0; e < E; ++e) {
    f.push_back(desc(fmts[e], d, n_ffs[e], gates[e], ups[e], downs[e]));
    idp.push_back(ptr<const int32_t>(ids[e]));
  }
  py::gil_scoped_release nogil;
  hi::ffn_sparse_multi(f.data(), int(E), ptr<const float>(x), b, idp.data(), ks.data(),
                       ptr<const float>(scales), hi::Act(act), threshold, exact, ptr<float>(y));
}

void gate_up_sparse(int fmt, int d, int n_ff, uintptr_t gate, uintptr_t up, uintptr_t x, int b,
                    uintptr_t ids, int64_t k, int act, float threshold, bool exact, uintptr_t a) {
  const FFNDesc f = desc(fmt, d, n_ff, gate, up, 0);
  py::gil_scoped_release nogil;
  hi::gate_up_sparse(f, ptr<const float>(x), b, ptr<const int32_t>(ids), k, hi::Act(act),
                     threshold, exact, ptr<float>(a));
}

void down_sparse(int fmt, int d, int n_ff, uintptr_t down, uintptr_t a, int b, uintptr_t ids,
                 int64_t k, bool skip_zero, uintptr_t y) {
  const FFNDesc f = desc(fmt, d, n_ff, 0, 0, down);
  py::gil_scoped_release nogil;
  hi::down_sparse(f, ptr<const float>(a), b, ptr<const int32_t>(ids), k, skip_zero, ptr<float>(y));
}

void linear(int fmt, int d, int n, uintptr_t w, uintptr_t x, int b, uintptr_t y) {
  py::gil_scoped_release nogil;
  hi::linear(hi::Fmt(fmt), d, n, ptr<const uint8_t>(w), ptr<const float>(x), b, ptr<float>(y));
}

// A ColdStep bound to the caller's buffers (pointers stay valid while the Python owner lives):
// per expert e, fmts[e] < 0 marks an expert without cold rows.
std::unique_ptr<hi::ColdStep> cold_step(
    const std::vector<int>& fmts, int d, const std::vector<int>& n_colds,
    const std::vector<uintptr_t>& gates, const std::vector<uintptr_t>& ups,
    const std::vector<uintptr_t>& downs, const std::vector<uintptr_t>& neurons,
    const std::vector<uintptr_t>& masks, uintptr_t sel, uintptr_t w, int k, uintptr_t x,
    uintptr_t y, int act, float threshold, bool exact, uintptr_t slot_masks, int64_t slot_stride) {
  const size_t E = fmts.size();
  if (n_colds.size() != E || gates.size() != E || ups.size() != E || downs.size() != E ||
      neurons.size() != E || masks.size() != E)
    throw py::value_error("cold_step: per-expert lists differ in length");
  std::vector<hi::ColdExpert> ex(E);
  for (size_t e = 0; e < E; ++e) {
    if (fmts[e] < 0) { ex[e].f = FFNDesc{hi::Fmt::F32, d, 0, nullptr, nullptr, nullptr}; continue; }
    ex[e].f = desc(fmts[e], d, n_colds[e], gates[e], ups[e], downs[e]);
    const int32_t* nr = ptr<const int32_t>(neurons[e]);
    ex[e].neuron.assign(nr, nr + n_colds[e]);
    ex[e].mask = ptr<const uint8_t>(masks[e]);
  }
  return std::make_unique<hi::ColdStep>(std::move(ex), d, ptr<const int64_t>(sel),
                                        ptr<const float>(w), k, ptr<const float>(x),
                                        ptr<float>(y), hi::Act(act), threshold, exact,
                                        ptr<const uint8_t>(slot_masks), slot_stride);
}

void rms_norm(uintptr_t x, uintptr_t add, uintptr_t w, int n, int d, float eps, uintptr_t sum,
              uintptr_t y) {
  py::gil_scoped_release nogil;
  hi::rms_norm(ptr<const float>(x), ptr<const float>(add), ptr<const float>(w), n, d, eps,
               ptr<float>(sum), ptr<float>(y));
}

void attend_one(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t kc, uintptr_t vc, int H, int KV,
                int hd, int cap, int pos, int lo, uintptr_t cos, uintptr_t sin, float scale,
                uintptr_t y) {
  py::gil_scoped_release nogil;
  hi::attend_one(ptr<const float>(q), ptr<const float>(k), ptr<const float>(v), ptr<float>(kc),
                 ptr<float>(vc), H, KV, hd, cap, pos, lo, ptr<const float>(cos),
                 ptr<const float>(sin), scale, ptr<float>(y));
}

// A ColdChain over native ColdSteps (owned by the Python wrapper, kernels/cpu.py ColdChain).
std::unique_ptr<hi::ColdChain> cold_chain(const std::vector<hi::ColdStep*>& steps,
                                          const std::vector<uintptr_t>& ready,
                                          const std::vector<uintptr_t>& done,
                                          const std::vector<uintptr_t>& ys, int d, double timeout) {
  const size_t n = steps.size();
  if (ready.size() != n || done.size() != n || ys.size() != n)
    throw py::value_error("cold_chain: per-link lists differ in length");
  std::vector<hi::ColdLink> links(n);
  for (size_t i = 0; i < n; ++i)
    links[i] = hi::ColdLink{steps[i], ptr<int32_t>(ready[i]), ptr<int32_t>(done[i]),
                            ptr<float>(ys[i]), d};
  return std::make_unique<hi::ColdChain>(std::move(links), timeout);
}

bool wait_flag(uintptr_t flag, double timeout, bool reset) {
  py::gil_scoped_release nogil;
  return hi::wait_flag(ptr<int32_t>(flag), timeout, reset);
}

void relu_mlp_t(int f1, int d, int r, uintptr_t w1, int f2, int n2, uintptr_t w2t, uintptr_t x,
                uintptr_t h, uintptr_t y) {
  py::gil_scoped_release nogil;
  hi::relu_mlp_t(hi::Fmt(f1), d, r, ptr<const uint8_t>(w1), hi::Fmt(f2), n2,
                 ptr<const uint8_t>(w2t), ptr<const float>(x), ptr<float>(h), ptr<float>(y));
}

std::unique_ptr<hi::AttnStep> attn_step(uintptr_t norm1, int qkv_fmt, int d, int n_qkv,
                                        uintptr_t qkv, int o_fmt, int d_o, uintptr_t o,
                                        uintptr_t norm2, float eps, uintptr_t kc, uintptr_t vc,
                                        int H, int KV, int hd, int cap) {
  return std::make_unique<hi::AttnStep>(
      ptr<const float>(norm1), hi::LinearDesc{hi::Fmt(qkv_fmt), d, n_qkv, ptr<const uint8_t>(qkv)},
      hi::LinearDesc{hi::Fmt(o_fmt), d_o, d, ptr<const uint8_t>(o)}, ptr<const float>(norm2), eps,
      ptr<float>(kc), ptr<float>(vc), H, KV, hd, cap);
}

double read_sum(uintptr_t p, size_t n) {
  py::gil_scoped_release nogil;
  return hi::read_sum(ptr<const float>(p), n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridinfer native kernels (sparse FFN on CPU; see csrc/kernels.h)";
  m.def("isa", [] { return std::string(hi::active_kernels().name); },
        "The kernel table in use now: 'avx2' or 'scalar'.");
  m.def("cpu_has_avx2", &hi::cpu_has_avx2, "Whether this CPU has AVX2+FMA+F16C (and it was built).");
  m.def("force_reference", &hi::force_reference, py::arg("on"),
        "Force the scalar reference kernels (initialised from HYBRIDINFER_FORCE_REF).");
  m.def("reference_forced", &hi::reference_forced);
  m.def("set_num_threads", [](int n) { py::gil_scoped_release nogil; hi::set_num_threads(n); },
        py::arg("n"), "Resize the persistent pool (n < 1: one thread per hardware thread).");
  m.def("get_num_threads", [] { py::gil_scoped_release nogil; return hi::get_num_threads(); });
  m.def("ffn_sparse_multi", &ffn_sparse_multi, py::arg("fmts"), py::arg("d"), py::arg("n_ffs"),
        py::arg("gates"), py::arg("ups"), py::arg("downs"), py::arg("x"), py::arg("b"),
        py::arg("ids"), py::arg("ks"), py::arg("scales"), py::arg("act"), py::arg("threshold"),
        py::arg("exact"), py::arg("y"));
  m.def("gate_up_sparse", &gate_up_sparse, py::arg("fmt"), py::arg("d"), py::arg("n_ff"),
        py::arg("gate"), py::arg("up"), py::arg("x"), py::arg("b"), py::arg("ids"), py::arg("k"),
        py::arg("act"), py::arg("threshold"), py::arg("exact"), py::arg("a"));
  m.def("down_sparse", &down_sparse, py::arg("fmt"), py::arg("d"), py::arg("n_ff"),
        py::arg("down"), py::arg("a"), py::arg("b"), py::arg("ids"), py::arg("k"),
        py::arg("skip_zero"), py::arg("y"));
  m.def("linear", &linear, py::arg("fmt"), py::arg("d"), py::arg("n"), py::arg("w"), py::arg("x"),
        py::arg("b"), py::arg("y"), "y [b, n] = x [b, d] W^T over n packed rows (a dense linear).");
  py::class_<hi::ColdStep>(m, "ColdStep",
                           "One layer's cold half per decode step, bound to static buffers.")
      .def("run", [](hi::ColdStep& c) { py::gil_scoped_release nogil; c.run(); },
           "Read the bound router/mask buffers, compute the chosen experts' cold rows into y.")
      .def("last_rows", &hi::ColdStep::last_rows);
  m.def("cold_step", &cold_step, py::arg("fmts"), py::arg("d"), py::arg("n_colds"),
        py::arg("gates"), py::arg("ups"), py::arg("downs"), py::arg("neurons"), py::arg("masks"),
        py::arg("sel"), py::arg("w"), py::arg("k"), py::arg("x"), py::arg("y"), py::arg("act"),
        py::arg("threshold"), py::arg("exact"), py::arg("slot_masks") = 0,
        py::arg("slot_stride") = 0);
  py::class_<hi::ColdChain>(m, "ColdChain",
                            "A decode step's cold halves, served by a host thread on device flags.")
      .def("begin", [](hi::ColdChain& c) { py::gil_scoped_release nogil; c.begin(); })
      .def("end", [](hi::ColdChain& c, bool cancel) { py::gil_scoped_release nogil; c.end(cancel); },
           py::arg("cancel") = false)
      .def("busy_s", &hi::ColdChain::busy_s)
      .def("wait_s", &hi::ColdChain::wait_s)
      .def("waits", &hi::ColdChain::waits);
  m.def("cold_chain", &cold_chain, py::arg("steps"), py::arg("ready"), py::arg("done"),
        py::arg("ys"), py::arg("d"), py::arg("timeout"));
  m.def("wait_flag", &wait_flag, py::arg("flag"), py::arg("timeout"), py::arg("reset"),
        "Spin until the int32 at flag is 1 (then store 0 when reset); False on timeout.");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("add"), py::arg("w"), py::arg("n"),
        py::arg("d"), py::arg("eps"), py::arg("sum"), py::arg("y"),
        "y [n, d] = RMSNorm(x + add) * w (float32; add / sum may be 0; sum = x + add).");
  m.def("attend_one", &attend_one, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kc"),
        py::arg("vc"), py::arg("H"), py::arg("KV"), py::arg("hd"), py::arg("cap"), py::arg("pos"),
        py::arg("lo"), py::arg("cos"), py::arg("sin"), py::arg("scale"), py::arg("y"),
        "One token's RoPE + KV-cache write + GQA attention (float32, see csrc/attention.h).");
  py::class_<hi::AttnStep>(m, "AttnStep", "A layer's attention half for one token (csrc/attention.h).")
      .def("run", [](hi::AttnStep& a, uintptr_t x, uintptr_t add, int pos, int lo, uintptr_t cos,
                     uintptr_t sin, uintptr_t x_out, uintptr_t h) {
             py::gil_scoped_release nogil;
             a.run(ptr<const float>(x), ptr<const float>(add), pos, lo, ptr<const float>(cos),
                   ptr<const float>(sin), ptr<float>(x_out), ptr<float>(h));
           });
  m.def("relu_mlp_t", &relu_mlp_t, py::arg("f1"), py::arg("d"), py::arg("r"), py::arg("w1"),
        py::arg("f2"), py::arg("n2"), py::arg("w2t"), py::arg("x"), py::arg("h"), py::arg("y"),
        "y [n2] = sum_j relu(W1 x)_j W2t[j, :] (rows with a zero activation unread).");
  m.def("attn_step", &attn_step, py::arg("norm1"), py::arg("qkv_fmt"), py::arg("d"),
        py::arg("n_qkv"), py::arg("qkv"), py::arg("o_fmt"), py::arg("d_o"), py::arg("o"),
        py::arg("norm2"), py::arg("eps"), py::arg("kc"), py::arg("vc"), py::arg("H"),
        py::arg("KV"), py::arg("hd"), py::arg("cap"));
  m.def("read_sum", &read_sum, py::arg("ptr"), py::arg("n"),
        "Sum of n float32 at ptr on the pool (the read-bandwidth probe).");
}

// nrcore._C: compiled kernels. Bindings take raw pointers (tensor.data_ptr()), shapes, strides
// and a dtype code (no libtorch), as keyword arguments named after the fields of the op's
// argument struct (nrcore/kernels.h). `device` < 0 runs the CPU kernel and returns its status bits;
// `device` >= 0 launches the CUDA kernel on `stream` (no host sync) and returns 0, the data checks
// of CUDA kernels being collected in a per-device error word (cuda_take_errors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nrcore/common.h"
#include "nrcore/kernels.h"
#if defined(NRCORE_WITH_CUDA)
#include "nrcore/launch.h"
#endif

namespace py = pybind11;
using nrcore::cpu_kernels;

namespace {

template <class T = void>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#if defined(NRCORE_WITH_CUDA)
#define NRCORE_RUN(name, args, device, stream)                                     \
  do {                                                                             \
    if ((device) >= 0) {                                                           \
      nrcore::cuda::name(args, (device), reinterpret_cast<void*>(stream));          \
      return 0;                                                                    \
    }                                                                              \
    py::gil_scoped_release nogil;                                                  \
    return cpu_kernels().name(args);                                               \
  } while (0)
#else
#define NRCORE_RUN(name, args, device, stream)                                     \
  do {                                                                             \
    (void)(stream);                                                                \
    if ((device) >= 0) throw std::runtime_error("nrcore._C was built without CUDA"); \
    py::gil_scoped_release nogil;                                                  \
    return cpu_kernels().name(args);                                               \
  } while (0)
#endif

std::vector<const void*> ptr_list(const std::vector<uintptr_t>& v) {
  std::vector<const void*> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = ptr<const void>(v[i]);
  return out;
}

// A kernel's argument struct filled from Python keyword arguments, field by field under the
// field's own name: NRCORE_TAKE(kw, a, feats_rs) reads kw["feats_rs"] into a.feats_rs, so an
// argument cannot land in another field (the positional lists this replaces could be swapped
// silently). A missing keyword, or one the binding does not read, is a TypeError naming it.
class Keywords {
 public:
  Keywords(const char* op, py::handle kw) : op_(op), kw_(py::reinterpret_borrow<py::dict>(kw)) {}

  template <class T>
  void take(const char* name, T& field) {
    py::handle v = get(name);
    if constexpr (std::is_pointer_v<T>) {
      field = reinterpret_cast<T>(v.cast<uintptr_t>());  // a tensor's data_ptr()
    } else {
      field = v.cast<T>();
    }
  }

  template <class T>
  std::vector<T> list(const char* name) {
    return get(name).cast<std::vector<T>>();
  }

  Keywords nested(const char* name) { return Keywords(op_, get(name)); }

  // Every keyword given was read (call after the last take).
  void finish() const {
    if (read_.size() == kw_.size()) return;
    for (auto item : kw_) {
      std::string key = py::str(item.first);
      bool seen = false;
      for (const auto& r : read_) seen = seen || r == key;
      if (!seen) throw py::type_error(std::string(op_) + ": unexpected keyword argument '" + key + "'");
    }
  }

 private:
  py::handle get(const char* name) {
    if (!kw_.contains(name)) throw py::type_error(std::string(op_) + ": missing keyword argument '" + name + "'");
    read_.emplace_back(name);
    return kw_[name];
  }

  const char* op_;
  py::dict kw_;
  std::vector<std::string> read_;
};

#define NRCORE_TAKE(kw, args, field) (kw).take(#field, (args).field)

nrcore::ConvGeometry conv_geometry(Keywords g) {
  nrcore::ConvGeometry out{};
  for (auto [name, field] : {std::pair{"channels", &out.channels}, {"height", &out.height}, {"width", &out.width},
                             {"kh", &out.kh}, {"kw", &out.kw}, {"stride_h", &out.stride_h}, {"stride_w", &out.stride_w},
                             {"pad_h", &out.pad_h}, {"pad_w", &out.pad_w}, {"dil_h", &out.dil_h}, {"dil_w", &out.dil_w},
                             {"out_h", &out.out_h}, {"out_w", &out.out_w}, {"sb", &out.sb}, {"sc", &out.sc},
                             {"sh", &out.sh}, {"sw", &out.sw}})
    g.take(name, *field);
  g.finish();
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nrcore compiled core: CPU kernels (and CUDA kernels when built with them)";
#if defined(NRCORE_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("cpu_isa", [] { return std::string(cpu_kernels().isa); }, "ISA level of the active CPU kernels");
  m.def("set_cpu_isa", &nrcore::set_cpu_isa, py::arg("cap"),
        "Use the best CPU kernels up to `cap` (base, v3, v4) that this CPU runs; returns the level chosen.");

  // Every kernel binding: (device, stream, **fields of its argument struct in kernels.h).
  m.def("fbr_prepare", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("fbr_prepare", kwargs);
    nrcore::FbrPrepareArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, m); NRCORE_TAKE(kw, a, d); NRCORE_TAKE(kw, a, num_classes);
    NRCORE_TAKE(kw, a, feats); NRCORE_TAKE(kw, a, feats_rs); NRCORE_TAKE(kw, a, feats_cs);
    NRCORE_TAKE(kw, a, labels); NRCORE_TAKE(kw, a, labels_s); NRCORE_TAKE(kw, a, center);
    NRCORE_TAKE(kw, a, mean); NRCORE_TAKE(kw, a, basis_t); NRCORE_TAKE(kw, a, counts);
    NRCORE_TAKE(kw, a, sq_norm_mean); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    NRCORE_RUN(fbr_prepare, a, device, stream);
  });

  m.def("fbr_direction", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("fbr_direction", kwargs);
    nrcore::FbrDirectionArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, batch); NRCORE_TAKE(kw, a, d); NRCORE_TAKE(kw, a, num_classes);
    NRCORE_TAKE(kw, a, feats); NRCORE_TAKE(kw, a, feats_rs); NRCORE_TAKE(kw, a, feats_cs);
    NRCORE_TAKE(kw, a, labels); NRCORE_TAKE(kw, a, labels_s); NRCORE_TAKE(kw, a, mean); NRCORE_TAKE(kw, a, basis_t);
    NRCORE_TAKE(kw, a, counts); NRCORE_TAKE(kw, a, use_total); NRCORE_TAKE(kw, a, row_shift);
    NRCORE_TAKE(kw, a, label_sign); NRCORE_TAKE(kw, a, lambda_pos); NRCORE_TAKE(kw, a, lambda_neg);
    NRCORE_TAKE(kw, a, scale); NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    NRCORE_RUN(fbr_direction, a, device, stream);
  });

  m.def("fbr_update", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("fbr_update", kwargs);
    nrcore::FbrUpdateArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, n); NRCORE_TAKE(kw, a, batch); NRCORE_TAKE(kw, a, weights);
    NRCORE_TAKE(kw, a, weights_s); NRCORE_TAKE(kw, a, index); NRCORE_TAKE(kw, a, index_s);
    NRCORE_TAKE(kw, a, direction); NRCORE_TAKE(kw, a, direction_s); NRCORE_TAKE(kw, a, step_size);
    NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    NRCORE_RUN(fbr_update, a, device, stream);
  });

  m.def("tangent_dot", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("tangent_dot", kwargs);
    nrcore::TangentDotArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, batch); NRCORE_TAKE(kw, a, T); NRCORE_TAKE(kw, a, p);
    NRCORE_TAKE(kw, a, q); NRCORE_TAKE(kw, a, k);
    NRCORE_TAKE(kw, a, acts); NRCORE_TAKE(kw, a, acts_sb); NRCORE_TAKE(kw, a, acts_st); NRCORE_TAKE(kw, a, acts_sp);
    NRCORE_TAKE(kw, a, grads); NRCORE_TAKE(kw, a, grads_sb); NRCORE_TAKE(kw, a, grads_st); NRCORE_TAKE(kw, a, grads_sq);
    NRCORE_TAKE(kw, a, direction); NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, strategy); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    NRCORE_RUN(tangent_dot, a, device, stream);
  });

  m.def("tangent_kernel", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("tangent_kernel", kwargs);
    nrcore::TangentKernelArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, batch_a); NRCORE_TAKE(kw, a, T); NRCORE_TAKE(kw, a, batch_b);
    NRCORE_TAKE(kw, a, S); NRCORE_TAKE(kw, a, p); NRCORE_TAKE(kw, a, q);
    NRCORE_TAKE(kw, a, acts_a); NRCORE_TAKE(kw, a, acts_a_sb); NRCORE_TAKE(kw, a, acts_a_st); NRCORE_TAKE(kw, a, acts_a_sp);
    NRCORE_TAKE(kw, a, grads_a); NRCORE_TAKE(kw, a, grads_a_sb); NRCORE_TAKE(kw, a, grads_a_st); NRCORE_TAKE(kw, a, grads_a_sq);
    NRCORE_TAKE(kw, a, acts_b); NRCORE_TAKE(kw, a, acts_b_sb); NRCORE_TAKE(kw, a, acts_b_st); NRCORE_TAKE(kw, a, acts_b_sp);
    NRCORE_TAKE(kw, a, grads_b); NRCORE_TAKE(kw, a, grads_b_sb); NRCORE_TAKE(kw, a, grads_b_st); NRCORE_TAKE(kw, a, grads_b_sq);
    NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, strategy); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    NRCORE_RUN(tangent_kernel, a, device, stream);
  });

  // Conv2d forms of the tangent ops (CPU only; on CUDA nrcore.ops unfolds with torch and calls
  // the generic kernels). geom / geom_a / geom_b: a dict of ConvGeometry's fields.
  m.def("conv_tangent_dot", [](py::kwargs kwargs) -> int {
    Keywords kw("conv_tangent_dot", kwargs);
    nrcore::ConvTangentDotArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, batch); NRCORE_TAKE(kw, a, q); NRCORE_TAKE(kw, a, k);
    NRCORE_TAKE(kw, a, x); a.geom = conv_geometry(kw.nested("geom"));
    NRCORE_TAKE(kw, a, grads); NRCORE_TAKE(kw, a, grads_sb); NRCORE_TAKE(kw, a, grads_sq); NRCORE_TAKE(kw, a, grads_st);
    NRCORE_TAKE(kw, a, direction_t); NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    py::gil_scoped_release nogil;
    return cpu_kernels().conv_tangent_dot(a);
  });

  m.def("conv_tangent_kernel", [](py::kwargs kwargs) -> int {
    Keywords kw("conv_tangent_kernel", kwargs);
    nrcore::ConvTangentKernelArgs a{};
    NRCORE_TAKE(kw, a, dtype); NRCORE_TAKE(kw, a, batch_a); NRCORE_TAKE(kw, a, batch_b); NRCORE_TAKE(kw, a, q);
    NRCORE_TAKE(kw, a, x_a); a.geom_a = conv_geometry(kw.nested("geom_a"));
    NRCORE_TAKE(kw, a, grads_a); NRCORE_TAKE(kw, a, grads_a_sb); NRCORE_TAKE(kw, a, grads_a_sq); NRCORE_TAKE(kw, a, grads_a_st);
    NRCORE_TAKE(kw, a, x_b); a.geom_b = conv_geometry(kw.nested("geom_b"));
    NRCORE_TAKE(kw, a, grads_b); NRCORE_TAKE(kw, a, grads_b_sb); NRCORE_TAKE(kw, a, grads_b_sq); NRCORE_TAKE(kw, a, grads_b_st);
    NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    py::gil_scoped_release nogil;
    return cpu_kernels().conv_tangent_kernel(a);
  });

  // The list fields (pointer arrays and their element counts) come as Python lists under the
  // field's name; the counts of the lists are their lengths.
  m.def("barrier_stats", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("barrier_stats", kwargs);
    nrcore::BarrierStatsArgs a{};
    NRCORE_TAKE(kw, a, pair_dtype); NRCORE_TAKE(kw, a, alpha_dtype);
    auto f = kw.list<uintptr_t>("f"), q = kw.list<uintptr_t>("q"), alpha = kw.list<uintptr_t>("alpha");
    auto pair_numel = kw.list<int64_t>("pair_numel"), alpha_numel = kw.list<int64_t>("alpha_numel");
    NRCORE_TAKE(kw, a, out); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    if (f.size() != q.size() || f.size() != pair_numel.size() || alpha.size() != alpha_numel.size())
      throw std::invalid_argument("barrier_stats: list lengths differ");
    auto fp = ptr_list(f), qp = ptr_list(q), ap = ptr_list(alpha);
    a.num_pairs = (int64_t)f.size();
    a.num_alpha = (int64_t)alpha.size();
    a.f = fp.data();
    a.q = qp.data();
    a.pair_numel = pair_numel.data();
    a.alpha = ap.data();
    a.alpha_numel = alpha_numel.data();
    NRCORE_RUN(barrier_stats, a, device, stream);
  });

  m.def("barrier_combine", [](int device, uintptr_t stream, py::kwargs kwargs) -> int {
    Keywords kw("barrier_combine", kwargs);
    nrcore::BarrierCombineArgs a{};
    NRCORE_TAKE(kw, a, dtype);
    auto outs = kw.list<uintptr_t>("outs"), f = kw.list<uintptr_t>("f"), q = kw.list<uintptr_t>("q");
    auto numel = kw.list<int64_t>("numel");
    NRCORE_TAKE(kw, a, coef); NRCORE_TAKE(kw, a, coef_ptr); NRCORE_TAKE(kw, a, skip); NRCORE_TAKE(kw, a, nthreads);
    kw.finish();
    if (outs.size() != q.size() || outs.size() != numel.size() || (!f.empty() && f.size() != q.size()))
      throw std::invalid_argument("barrier_combine: list lengths differ");
    std::vector<void*> op(outs.size());
    for (size_t i = 0; i < outs.size(); ++i) op[i] = ptr(outs[i]);
    auto fp = ptr_list(f), qp = ptr_list(q);
    a.num = (int64_t)outs.size();
    a.outs = op.data();
    a.f = f.empty() ? nullptr : fp.data();
    a.q = qp.data();
    a.numel = numel.data();
    NRCORE_RUN(barrier_combine, a, device, stream);
  });

  // max(delta - dot / (sq_w + sq_alpha), 0); 0 when the denominator is 0 or the stats are flagged
  // non-finite. Tiny, so on the CPU it runs inline; on CUDA it is one thread of one block.
  m.def("barrier_coefficient", [](int device, uintptr_t stream, uintptr_t stats, double delta, uintptr_t out) -> int {
#if defined(NRCORE_WITH_CUDA)
    if (device >= 0) {
      nrcore::cuda::barrier_coefficient(ptr<const double>(stats), delta, ptr<double>(out), device,
                                        reinterpret_cast<void*>(stream));
      return 0;
    }
#else
    (void)stream;
    if (device >= 0) throw std::runtime_error("nrcore._C was built without CUDA");
#endif
    const double* s = ptr<const double>(stats);
    *ptr<double>(out) = nrcore::barrier_coefficient_value(s[0], s[1], s[2], s[3], delta);
    return 0;
  });

#if defined(NRCORE_WITH_CUDA)
  m.def("cuda_take_errors", &nrcore::cuda::take_errors, py::arg("device"),
        "Status bits that CUDA kernels on `device` recorded since the last call (synchronises), then reset them.");
#endif
}

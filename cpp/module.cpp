// nrcore._C: compiled kernels. Bindings take raw pointers (tensor.data_ptr()), shapes, strides
// and a dtype code (no libtorch). `device` < 0 runs the CPU kernel and returns its status bits;
// `device` >= 0 launches the CUDA kernel on `stream` (no host sync) and returns 0, the data checks
// of CUDA kernels being collected in a per-device error word (cuda_take_errors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "kernels.h"
#if defined(NRCORE_WITH_CUDA)
#include "../cuda/launch.h"
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

nrcore::ConvGeometry conv_geometry(const std::vector<int64_t>& g) {
  if (g.size() != 17) throw std::invalid_argument("conv geometry needs 17 integers");
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15], g[16]};
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

  m.def("fbr_prepare",
        [](int device, uintptr_t stream, int dtype, int64_t mm, int64_t d, int64_t C, uintptr_t feats, int64_t rs,
           int64_t cs, uintptr_t labels, int64_t ls, bool center, uintptr_t mean, uintptr_t basis_t, uintptr_t counts,
           uintptr_t sq_norm, int nthreads) -> int {
          nrcore::FbrPrepareArgs a{dtype,       mm,          d,           C,         ptr<const void>(feats), rs, cs,
                                   ptr<const int64_t>(labels), ls, center, ptr(mean), ptr(basis_t),
                                   ptr<int64_t>(counts),     ptr<double>(sq_norm), nthreads};
          NRCORE_RUN(fbr_prepare, a, device, stream);
        });

  m.def("fbr_direction",
        [](int device, uintptr_t stream, int dtype, int64_t B, int64_t d, int64_t C, uintptr_t feats, int64_t rs,
           int64_t cs, uintptr_t labels, int64_t ls, uintptr_t mean, uintptr_t basis_t, uintptr_t counts, bool use_total,
           bool row_shift, bool label_sign, double lambda_pos, double lambda_neg, double scale, uintptr_t out,
           int nthreads) -> int {
          nrcore::FbrDirectionArgs a{dtype, B, d, C, ptr<const void>(feats), rs, cs, ptr<const int64_t>(labels), ls,
                                     ptr<const void>(mean), ptr<const void>(basis_t), ptr<const int64_t>(counts),
                                     use_total, row_shift, label_sign, lambda_pos, lambda_neg, scale, ptr(out),
                                     nthreads};
          NRCORE_RUN(fbr_direction, a, device, stream);
        });

  m.def("fbr_update",
        [](int device, uintptr_t stream, int dtype, int64_t n, int64_t B, uintptr_t weights, int64_t ws,
           uintptr_t index, int64_t is, uintptr_t direction, int64_t ds, double step, int nthreads) -> int {
          nrcore::FbrUpdateArgs a{dtype, n, B, ptr(weights), ws, ptr<const int64_t>(index), is,
                                  ptr<const void>(direction), ds, step, nthreads};
          NRCORE_RUN(fbr_update, a, device, stream);
        });

  m.def("tangent_dot",
        [](int device, uintptr_t stream, int dtype, int64_t B, int64_t T, int64_t p, int64_t q, int64_t k,
           uintptr_t acts, int64_t asb, int64_t ast, int64_t asp, uintptr_t grads, int64_t gsb, int64_t gst,
           int64_t gsq, uintptr_t direction, uintptr_t out, int strategy, int nthreads) -> int {
          nrcore::TangentDotArgs a{dtype, B, T, p, q, k, ptr<const void>(acts), asb, ast, asp, ptr<const void>(grads),
                                   gsb, gst, gsq, ptr<const void>(direction), ptr(out), strategy, nthreads};
          NRCORE_RUN(tangent_dot, a, device, stream);
        });

  m.def("tangent_kernel",
        [](int device, uintptr_t stream, int dtype, int64_t B, int64_t T, int64_t M, int64_t S, int64_t p, int64_t q,
           uintptr_t acts_a, int64_t a1, int64_t a2, int64_t a3, uintptr_t grads_a, int64_t g1, int64_t g2, int64_t g3,
           uintptr_t acts_b, int64_t b1, int64_t b2, int64_t b3, uintptr_t grads_b, int64_t h1, int64_t h2, int64_t h3,
           uintptr_t out, int strategy, int nthreads) -> int {
          nrcore::TangentKernelArgs a{dtype, B, T, M, S, p, q, ptr<const void>(acts_a), a1, a2, a3,
                                      ptr<const void>(grads_a), g1, g2, g3, ptr<const void>(acts_b), b1, b2, b3,
                                      ptr<const void>(grads_b), h1, h2, h3, ptr(out), strategy, nthreads};
          NRCORE_RUN(tangent_kernel, a, device, stream);
        });

  // Conv2d forms of the tangent ops (CPU; on CUDA nrcore.ops unfolds with torch and calls the
  // generic kernels). geom: C, H, W, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h,
  // out_w and x's strides (b, c, h, w).
  m.def("conv_tangent_dot",
        [](int dtype, int64_t B, int64_t q, int64_t k, uintptr_t x, const std::vector<int64_t>& geom, uintptr_t grads,
           int64_t gsb, int64_t gsq, int64_t gst, uintptr_t direction_t, uintptr_t out, int nthreads) -> int {
          nrcore::ConvTangentDotArgs a{dtype, B, q, k, ptr<const void>(x), conv_geometry(geom), ptr<const void>(grads),
                                       gsb, gsq, gst, ptr<const void>(direction_t), ptr(out), nthreads};
          py::gil_scoped_release nogil;
          return cpu_kernels().conv_tangent_dot(a);
        });

  m.def("conv_tangent_kernel",
        [](int dtype, int64_t B, int64_t M, int64_t q, uintptr_t x_a, const std::vector<int64_t>& geom_a,
           uintptr_t grads_a, int64_t ga1, int64_t ga2, int64_t ga3, uintptr_t x_b, const std::vector<int64_t>& geom_b,
           uintptr_t grads_b, int64_t gb1, int64_t gb2, int64_t gb3, uintptr_t out, int nthreads) -> int {
          nrcore::ConvTangentKernelArgs a{dtype,  B,   M,   q,   ptr<const void>(x_a), conv_geometry(geom_a),
                                          ptr<const void>(grads_a), ga1, ga2, ga3, ptr<const void>(x_b),
                                          conv_geometry(geom_b), ptr<const void>(grads_b), gb1, gb2, gb3, ptr(out),
                                          nthreads};
          py::gil_scoped_release nogil;
          return cpu_kernels().conv_tangent_kernel(a);
        });

  m.def("barrier_stats",
        [](int device, uintptr_t stream, int pair_dtype, const std::vector<uintptr_t>& f,
           const std::vector<uintptr_t>& q, const std::vector<int64_t>& pair_numel, int alpha_dtype,
           const std::vector<uintptr_t>& alpha, const std::vector<int64_t>& alpha_numel, uintptr_t out,
           int nthreads) -> int {
          if (f.size() != q.size() || f.size() != pair_numel.size() || alpha.size() != alpha_numel.size())
            throw std::invalid_argument("barrier_stats: list lengths differ");
          auto fp = ptr_list(f), qp = ptr_list(q), ap = ptr_list(alpha);
          nrcore::BarrierStatsArgs a{pair_dtype,         alpha_dtype,  (int64_t)f.size(),  (int64_t)alpha.size(),
                                     fp.data(),          qp.data(),    pair_numel.data(), ap.data(),
                                     alpha_numel.data(), ptr<double>(out), nthreads};
          NRCORE_RUN(barrier_stats, a, device, stream);
        });

  m.def("barrier_combine",
        [](int device, uintptr_t stream, int dtype, const std::vector<uintptr_t>& outs,
           const std::vector<uintptr_t>& f, const std::vector<uintptr_t>& q, const std::vector<int64_t>& numel,
           double coef, uintptr_t coef_ptr, uintptr_t skip_ptr, int nthreads) -> int {
          if (outs.size() != q.size() || outs.size() != numel.size() || (!f.empty() && f.size() != q.size()))
            throw std::invalid_argument("barrier_combine: list lengths differ");
          std::vector<void*> op(outs.size());
          for (size_t i = 0; i < outs.size(); ++i) op[i] = ptr(outs[i]);
          auto fp = ptr_list(f), qp = ptr_list(q);
          nrcore::BarrierCombineArgs a{dtype,     (int64_t)outs.size(), op.data(), f.empty() ? nullptr : fp.data(),
                                       qp.data(), numel.data(),         coef,      ptr<const double>(coef_ptr),
                                       ptr<const double>(skip_ptr), nthreads};
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

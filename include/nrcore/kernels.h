// Argument structs of the compiled kernels (shared by the CPU and CUDA back ends) and the table
// of CPU kernels that each ISA build provides. Pointers are raw data pointers of torch tensors;
// strides are in elements. Unless a comment says otherwise a floating pointer has the op's dtype.
#pragma once

#include <cstdint>
#include <string>

namespace nrcore {

struct FbrPrepareArgs {
  int dtype;
  int64_t m, d, num_classes;
  const void* feats;            // [m, d]
  int64_t feats_rs, feats_cs;
  const int64_t* labels;        // [m]
  int64_t labels_s;
  bool center;
  void* mean;                   // out [d]: clean mean (zeros when !center)
  void* basis_t;                // out [d, C+1] contiguous: columns are the centred class means M_c, then
                                // sum_j (phi_j - mean) (transposed so a batch GEMM reads rows of it)
  int64_t* counts;              // out [C]
  double* sq_norm_mean;         // out [1]: mean_j |phi_j - mean|^2
  int nthreads;
};

struct FbrDirectionArgs {
  int dtype;
  int64_t batch, d, num_classes;
  const void* feats;            // [B, d]
  int64_t feats_rs, feats_cs;
  const int64_t* labels;        // [B]
  int64_t labels_s;
  const void* mean;             // [d]
  const void* basis_t;          // [d, C+1] (see FbrPrepareArgs)
  const int64_t* counts;        // [C]
  bool use_total;               // read column C of basis_t (only needed when the clean set is not centred)
  bool row_shift, label_sign;
  double lambda_pos, lambda_neg;
  double scale;                 // multiplies the direction (1, or 1/(m * sq_norm_mean) when normalising)
  void* out;                    // [B] contiguous, accumulation dtype (float32 for half inputs)
  int nthreads;
};

struct FbrUpdateArgs {
  int dtype;                    // of weights and direction
  int64_t n, batch;
  void* weights;                // [n]
  int64_t weights_s;
  const int64_t* index;         // [B]
  int64_t index_s;
  const void* direction;        // [B]
  int64_t direction_s;
  double step_size;
  int nthreads;
};

// Which contraction the tangent kernels use: by estimated cost, or forced (tests, benchmarks).
enum TangentStrategy : int { kAuto = 0, kGhost = 1, kExplicit = 2 };

struct TangentDotArgs {
  int dtype;
  int64_t batch, T, p, q, k;
  const void* acts;             // [B, T, p]
  int64_t acts_sb, acts_st, acts_sp;
  const void* grads;            // [B, T, q]
  int64_t grads_sb, grads_st, grads_sq;
  const void* direction;        // [k, q, p] contiguous
  void* out;                    // [B, k] contiguous, accumulation dtype
  int strategy;
  int nthreads;
};

struct TangentKernelArgs {
  int dtype;
  int64_t batch_a, T, batch_b, S, p, q;
  const void* acts_a;           // [B, T, p]
  int64_t acts_a_sb, acts_a_st, acts_a_sp;
  const void* grads_a;          // [B, T, q]
  int64_t grads_a_sb, grads_a_st, grads_a_sq;
  const void* acts_b;           // [M, S, p]
  int64_t acts_b_sb, acts_b_st, acts_b_sp;
  const void* grads_b;          // [M, S, q]
  int64_t grads_b_sb, grads_b_st, grads_b_sq;
  void* out;                    // [B, M] contiguous, accumulation dtype
  int strategy;
  int nthreads;
};

// A Conv2d layer's input x [B, C, H, W] (element strides sb, sc, sh, sw) and geometry: its
// im2col patches are the `acts` of the tangent ops, T = out_h * out_w, p = C * kh * kw, in
// F.unfold's (c, i, j) order. The kernels gather them per example instead of materialising them.
struct ConvGeometry {
  int64_t channels, height, width, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h, out_w;
  int64_t sb, sc, sh, sw;
};

// Explicit per-example gradients G_i^T = patches_i^T grads_i ([p, q]) of a Conv2d layer.
struct ConvTangentDotArgs {
  int dtype;
  int64_t batch, q, k;
  const void* x;
  ConvGeometry geom;
  const void* grads;            // [B, q, T]: (b, j, t) at b * grads_sb + j * grads_sq + t * grads_st
  int64_t grads_sb, grads_sq, grads_st;
  const void* direction_t;      // [k, p, q] contiguous (the direction transposed to G_i^T's layout)
  void* out;                    // [B, k] contiguous
  int nthreads;
};

struct ConvTangentKernelArgs {
  int dtype;
  int64_t batch_a, batch_b, q;
  const void* x_a;
  ConvGeometry geom_a;
  const void* grads_a;
  int64_t grads_a_sb, grads_a_sq, grads_a_st;
  const void* x_b;
  ConvGeometry geom_b;
  const void* grads_b;
  int64_t grads_b_sb, grads_b_sq, grads_b_st;
  void* out;                    // [B, M] contiguous
  int nthreads;
};

// Flat dense tensors. The list pairs (grads_f[i], grads_q[i]) share a dtype and a layout.
struct BarrierStatsArgs {
  int pair_dtype, alpha_dtype;
  int64_t num_pairs, num_alpha;
  const void* const* f;         // [num_pairs]
  const void* const* q;         // [num_pairs]
  const int64_t* pair_numel;    // [num_pairs]
  const void* const* alpha;     // [num_alpha]
  const int64_t* alpha_numel;   // [num_alpha]
  double* out;                  // [4] float64: <f,q>, |q|^2, |alpha|^2, non-finite flag
  int nthreads;
};

struct BarrierCombineArgs {
  int dtype;
  int64_t num;
  void* const* outs;            // [num]
  const void* const* f;         // [num], or nullptr: outs = coef * q
  const void* const* q;         // [num]
  const int64_t* numel;         // [num]
  double coef;                  // CPU: the coefficient's value
  const double* coef_ptr;       // CUDA: device pointer to a float64 coefficient, or nullptr (use coef)
  const double* skip;           // float64 flag on the op's device, or nullptr: nonzero = write and report nothing
  int nthreads;
};

struct CpuKernels {
  const char* isa;
  int (*fbr_prepare)(const FbrPrepareArgs&);
  int (*fbr_direction)(const FbrDirectionArgs&);
  int (*fbr_update)(const FbrUpdateArgs&);
  int (*tangent_dot)(const TangentDotArgs&);
  int (*tangent_kernel)(const TangentKernelArgs&);
  int (*conv_tangent_dot)(const ConvTangentDotArgs&);
  int (*conv_tangent_kernel)(const ConvTangentKernelArgs&);
  int (*barrier_stats)(const BarrierStatsArgs&);
  int (*barrier_combine)(const BarrierCombineArgs&);
};

// The kernels of the best ISA level this CPU supports (dispatch.cpp), capped by the environment
// variable NRCORE_CPU_ISA=base|v3|v4 at import or by set_cpu_isa (tests compare the levels).
const CpuKernels& cpu_kernels();
const char* set_cpu_isa(const std::string& cap);

// Defined once per ISA level in table.cpp, e.g. nrcore::v3::kernel_table().
namespace base { const CpuKernels& kernel_table(); }
namespace v3 { const CpuKernels& kernel_table(); }
namespace v4 { const CpuKernels& kernel_table(); }

}  // namespace nrcore

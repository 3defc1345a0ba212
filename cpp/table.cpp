// The CPU kernel table of one ISA level (compiled once per level, see CMakeLists.txt).
#include "nrcore/kernels.h"

#define NRCORE_STR2(x) #x
#define NRCORE_STR(x) NRCORE_STR2(x)

namespace nrcore {
namespace NRCORE_ISA {

int fbr_prepare(const FbrPrepareArgs&);
int fbr_direction(const FbrDirectionArgs&);
int fbr_update(const FbrUpdateArgs&);
int tangent_dot(const TangentDotArgs&);
int tangent_kernel(const TangentKernelArgs&);
int conv_tangent_dot(const ConvTangentDotArgs&);
int conv_tangent_kernel(const ConvTangentKernelArgs&);
int barrier_stats(const BarrierStatsArgs&);
int barrier_combine(const BarrierCombineArgs&);

const CpuKernels& kernel_table() {
  static const CpuKernels table{NRCORE_STR(NRCORE_ISA), &fbr_prepare,         &fbr_direction, &fbr_update,
                                &tangent_dot,           &tangent_kernel,       &conv_tangent_dot,
                                &conv_tangent_kernel,   &barrier_stats,        &barrier_combine};
  return table;
}

}  // namespace NRCORE_ISA
}  // namespace nrcore

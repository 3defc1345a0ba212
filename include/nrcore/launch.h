// Host entry points of the CUDA kernels (called by cpp/module.cpp). Each launches on `stream`
// (a cudaStream_t) on `device` and returns without synchronising; data problems (labels out of
// range, non-finite outputs) are OR-ed into the device's error word, read by take_errors().
#pragma once

#include "kernels.h"

namespace nrcore {
namespace cuda {

void fbr_prepare(const FbrPrepareArgs& a, int device, void* stream);
void fbr_direction(const FbrDirectionArgs& a, int device, void* stream);
void fbr_update(const FbrUpdateArgs& a, int device, void* stream);
void tangent_dot(const TangentDotArgs& a, int device, void* stream);
void tangent_kernel(const TangentKernelArgs& a, int device, void* stream);
void barrier_stats(const BarrierStatsArgs& a, int device, void* stream);
void barrier_combine(const BarrierCombineArgs& a, int device, void* stream);
void barrier_coefficient(const double* stats, double delta, double* out, int device, void* stream);

// Error word of `device` since the last call (low byte: status bits, bit 8 + op id: which op),
// then reset. Synchronises the device.
int take_errors(int device);

}  // namespace cuda
}  // namespace nrcore

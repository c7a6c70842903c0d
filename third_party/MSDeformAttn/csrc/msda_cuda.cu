// CUDA kernels for multi-scale deformable attention.
//
// Forward: one thread per output element (n, q, head, channel); it loops over levels and
// points, samples its channel bilinearly and accumulates in acc_t (float for fp32 / fp16 /
// bf16, double for fp64).
//
// Backward: threads are laid out the same way, with each (n, q, head) group padded to
// `lanes` threads (D rounded up to a power of two <= 32, or to a multiple of 32), so a
// group never straddles a warp boundary unevenly. grad_value is scattered with atomicAdd
// into an acc_t buffer (cast to half / bf16 afterwards); the per-(level, point) gradients
// of the locations and weights are channel sums, reduced with warp shuffles inside each
// group and stored by the group's first lane (atomicAdd when a group spans several warps).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// The current stream comes from c10 directly (at::cuda::getCurrentCUDAStream is the same
// function): ATen/cuda/CUDAContext.h would also pull in cuBLAS / cuSPARSE headers, which a
// minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "msda.h"

namespace m2fsim {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

struct DeviceAtomicAdd {
  template <typename T>
  C10_HOST_DEVICE void operator()(T* ptr, T amount) const {
#if defined(__CUDA_ARCH__)
    atomicAdd(ptr, amount);
#else
    *ptr += amount;  // never used: kernels run on the device
#endif
  }
};

int64_t blocks_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return std::min<int64_t>(std::max<int64_t>(blocks, 1), (int64_t{1} << 31) - 1);
}

template <typename scalar_t, typename acc_t>
__global__ void msda_forward_kernel(const scalar_t* __restrict__ value,
                                    const int64_t* __restrict__ shapes,
                                    const int64_t* __restrict__ starts,
                                    const acc_t* __restrict__ loc,
                                    const acc_t* __restrict__ attn, scalar_t* __restrict__ out,
                                    const MsdaSizes sz) {
  const int64_t total = sz.n * sz.lq * sz.m * sz.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += step) {
    const int64_t c = t % sz.d;
    const int64_t g = t / sz.d;  // (n, q, head)
    const int64_t m = g % sz.m;
    const int64_t n = g / (sz.m * sz.lq);
    const int64_t chan = (n * sz.s * sz.m + m) * sz.d + c;
    const int64_t stride = sz.m * sz.d;
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < sz.l; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const scalar_t* lvl = value + chan + starts[l] * stride;
      for (int64_t p = 0; p < sz.p; ++p) {
        const int64_t k = (g * sz.l + l) * sz.p + p;
        const acc_t x = loc[2 * k] * acc_t(w) - acc_t(0.5);
        const acc_t y = loc[2 * k + 1] * acc_t(h) - acc_t(0.5);
        acc += attn[k] * sample_bilinear<scalar_t, acc_t>(lvl, stride, h, w, y, x);
      }
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int width) {
  for (int off = width / 2; off > 0; off /= 2) {
    v += __shfl_down_sync(kFullMask, v, off, width);
  }
  return v;
}

// `total` is groups * lanes rounded up to a multiple of 32 and blockDim.x is a multiple of
// 32, so every warp runs the same number of loop iterations and all its lanes reach the
// shuffles together (lanes without work contribute zeros).
template <typename scalar_t, typename acc_t>
__global__ void msda_backward_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ value,
                                     const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts,
                                     const acc_t* __restrict__ loc,
                                     const acc_t* __restrict__ attn, acc_t* grad_value,
                                     acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn,
                                     const MsdaSizes sz, const int64_t lanes,
                                     const int64_t total) {
  const int64_t groups = sz.n * sz.lq * sz.m;
  const int width = lanes < 32 ? static_cast<int>(lanes) : 32;
  const bool exclusive = lanes <= 32;  // one shuffle segment per group: plain stores
  const int64_t stride = sz.m * sz.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += step) {
    const int64_t g = t / lanes;
    const int64_t c = t % lanes;
    const bool in_group = g < groups;
    const bool active = in_group && c < sz.d;
    const bool leader = in_group && (t % width) == 0;
    int64_t chan = 0;
    acc_t go = acc_t(0);
    if (active) {
      const int64_t m = g % sz.m;
      const int64_t n = g / (sz.m * sz.lq);
      chan = (n * sz.s * sz.m + m) * sz.d + c;
      go = static_cast<acc_t>(grad_out[g * sz.d + c]);
    }
    for (int64_t l = 0; l < sz.l; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const int64_t lvl = chan + starts[l] * stride;
      for (int64_t p = 0; p < sz.p; ++p) {
        const int64_t k = (g * sz.l + l) * sz.p + p;
        acc_t part_a = acc_t(0), part_x = acc_t(0), part_y = acc_t(0);
        if (active) {
          const acc_t x = loc[2 * k] * acc_t(w) - acc_t(0.5);
          const acc_t y = loc[2 * k + 1] * acc_t(h) - acc_t(0.5);
          const acc_t a = attn[k];
          acc_t dy, dx;
          const acc_t val = sample_bilinear_backward<scalar_t, acc_t>(
              value + lvl, grad_value + lvl, stride, h, w, y, x, go * a, dy, dx,
              DeviceAtomicAdd{});
          part_a = go * val;
          part_x = go * a * dx * acc_t(w);
          part_y = go * a * dy * acc_t(h);
        }
        part_a = group_sum(part_a, width);
        part_x = group_sum(part_x, width);
        part_y = group_sum(part_y, width);
        if (leader) {
          if (exclusive) {
            grad_attn[k] = part_a;
            grad_loc[2 * k] = part_x;
            grad_loc[2 * k + 1] = part_y;
          } else {
            atomicAdd(grad_attn + k, part_a);
            atomicAdd(grad_loc + 2 * k, part_x);
            atomicAdd(grad_loc + 2 * k + 1, part_y);
          }
        }
      }
    }
  }
}

}  // namespace

void msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                       const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                       at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaSizes sz = sizes_of(value, loc);
  const int64_t total = sz.n * sz.lq * sz.m * sz.d;
  if (total == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "m2fsim_msda_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        msda_forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), sz);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& grad_out, const at::Tensor& value,
                                           const at::Tensor& shapes, const at::Tensor& starts,
                                           const at::Tensor& loc, const at::Tensor& attn) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaSizes sz = sizes_of(value, loc);
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(loc.scalar_type()));
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  const int64_t groups = sz.n * sz.lq * sz.m;
  if (groups > 0 && sz.d > 0 && sz.l * sz.p > 0) {
    int64_t lanes = 1;
    if (sz.d <= 32) {
      while (lanes < sz.d) lanes *= 2;
    } else {
      lanes = (sz.d + 31) / 32 * 32;
    }
    const int64_t total = (groups * lanes + 31) / 32 * 32;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "m2fsim_msda_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          msda_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(),
              attn.data_ptr<acc_t>(), grad_value_acc.data_ptr<acc_t>(),
              grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), sz, lanes, total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                              ? grad_value_acc
                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace m2fsim

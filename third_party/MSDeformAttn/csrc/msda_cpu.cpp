// Host implementation of multi-scale deformable attention. It runs the same per-channel
// sampling code as the CUDA kernels (msda_sampling.h), so the kernels' arithmetic can be
// tested on a machine without a GPU; the Python dispatcher uses the torch reference on CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "msda.h"

namespace m2fsim {
namespace {

struct HostAdd {
  template <typename T>
  void operator()(T* ptr, T amount) const {
    *ptr += amount;
  }
};

}  // namespace

void msda_forward_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                      const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out) {
  const MsdaSizes sz = sizes_of(value, loc);
  const int64_t groups = sz.n * sz.lq * sz.m;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "m2fsim_msda_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* v = value.data_ptr<scalar_t>();
        const int64_t* hw = shapes.data_ptr<int64_t>();
        const int64_t* st = starts.data_ptr<int64_t>();
        const acc_t* lp = loc.data_ptr<acc_t>();
        const acc_t* ap = attn.data_ptr<acc_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> acc(sz.d);
          for (int64_t g = begin; g < end; ++g) {
            const int64_t n = g / (sz.lq * sz.m);
            const int64_t m = g % sz.m;
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t l = 0; l < sz.l; ++l) {
              const int64_t h = hw[2 * l], w = hw[2 * l + 1];
              const scalar_t* lvl = v + ((n * sz.s + st[l]) * sz.m + m) * sz.d;
              for (int64_t p = 0; p < sz.p; ++p) {
                const int64_t k = (g * sz.l + l) * sz.p + p;
                const acc_t x = lp[2 * k] * acc_t(w) - acc_t(0.5);
                const acc_t y = lp[2 * k + 1] * acc_t(h) - acc_t(0.5);
                const acc_t a = ap[k];
                for (int64_t c = 0; c < sz.d; ++c) {
                  acc[c] += a * sample_bilinear<scalar_t, acc_t>(lvl + c, sz.m * sz.d, h, w, y, x);
                }
              }
            }
            for (int64_t c = 0; c < sz.d; ++c) {
              o[g * sz.d + c] = static_cast<scalar_t>(acc[c]);
            }
          }
        });
      });
}

std::vector<at::Tensor> msda_backward_cpu(const at::Tensor& grad_out, const at::Tensor& value,
                                          const at::Tensor& shapes, const at::Tensor& starts,
                                          const at::Tensor& loc, const at::Tensor& attn) {
  const MsdaSizes sz = sizes_of(value, loc);
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(loc.scalar_type()));
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "m2fsim_msda_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* go = grad_out.data_ptr<scalar_t>();
        const scalar_t* v = value.data_ptr<scalar_t>();
        const int64_t* hw = shapes.data_ptr<int64_t>();
        const int64_t* st = starts.data_ptr<int64_t>();
        const acc_t* lp = loc.data_ptr<acc_t>();
        const acc_t* ap = attn.data_ptr<acc_t>();
        acc_t* gv = grad_value_acc.data_ptr<acc_t>();
        acc_t* gl = grad_loc.data_ptr<acc_t>();
        acc_t* ga = grad_attn.data_ptr<acc_t>();
        // Work split by (batch, head): those pairs write disjoint parts of grad_value.
        at::parallel_for(0, sz.n * sz.m, 1, [&](int64_t begin, int64_t end) {
          for (int64_t nm = begin; nm < end; ++nm) {
            const int64_t n = nm / sz.m;
            const int64_t m = nm % sz.m;
            for (int64_t q = 0; q < sz.lq; ++q) {
              const int64_t g = (n * sz.lq + q) * sz.m + m;
              for (int64_t l = 0; l < sz.l; ++l) {
                const int64_t h = hw[2 * l], w = hw[2 * l + 1];
                const int64_t off = ((n * sz.s + st[l]) * sz.m + m) * sz.d;
                for (int64_t p = 0; p < sz.p; ++p) {
                  const int64_t k = (g * sz.l + l) * sz.p + p;
                  const acc_t x = lp[2 * k] * acc_t(w) - acc_t(0.5);
                  const acc_t y = lp[2 * k + 1] * acc_t(h) - acc_t(0.5);
                  const acc_t a = ap[k];
                  acc_t sum_a = 0, sum_x = 0, sum_y = 0;
                  for (int64_t c = 0; c < sz.d; ++c) {
                    const acc_t gc = static_cast<acc_t>(go[g * sz.d + c]);
                    acc_t dy, dx;
                    const acc_t val = sample_bilinear_backward<scalar_t, acc_t>(
                        v + off + c, gv + off + c, sz.m * sz.d, h, w, y, x, gc * a, dy, dx,
                        HostAdd{});
                    sum_a += gc * val;
                    sum_x += gc * dx;
                    sum_y += gc * dy;
                  }
                  ga[k] = sum_a;
                  gl[2 * k] = a * sum_x * acc_t(w);
                  gl[2 * k + 1] = a * sum_y * acc_t(h);
                }
              }
            }
          }
        });
      });
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                              ? grad_value_acc
                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace m2fsim

// Declarations of the multi-scale deformable attention implementations (host and CUDA).
// Inputs are validated by msda_bind.cpp: contiguous, on one device, value in
// {fp64, fp32, fp16, bf16}, locations/weights in value's accumulation type (fp64 for fp64
// value, fp32 otherwise), spatial_shapes / level_start_index int64.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "msda_sampling.h"

namespace m2fsim {

inline MsdaSizes sizes_of(const at::Tensor& value, const at::Tensor& loc) {
  return MsdaSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                   loc.size(1),   loc.size(3),   loc.size(4)};
}

// Writes every element of `out` (N, Lq, M * D), value's dtype.
void msda_forward_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                      const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out);
void msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                       const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                       at::Tensor& out);

// Returns {grad_value (value's dtype), grad_loc (loc's dtype), grad_attn (attn's dtype)}.
std::vector<at::Tensor> msda_backward_cpu(const at::Tensor& grad_out, const at::Tensor& value,
                                          const at::Tensor& shapes, const at::Tensor& starts,
                                          const at::Tensor& loc, const at::Tensor& attn);
std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& grad_out, const at::Tensor& value,
                                           const at::Tensor& shapes, const at::Tensor& starts,
                                           const at::Tensor& loc, const at::Tensor& attn);

}  // namespace m2fsim

// Python binding of the m2fsim_msda extension: input checks and device dispatch.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "msda.h"

namespace m2fsim {
namespace {

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                  const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "m2fsim_msda: value must be (N, S, heads, dim), got ",
              value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "m2fsim_msda: sampling_locations must be (N, Lq, heads, levels, points, 2), got ",
              loc.sizes());
  TORCH_CHECK(attn.dim() == 5 && attn.sizes() == loc.sizes().slice(0, 5),
              "m2fsim_msda: attention_weights must be (N, Lq, heads, levels, points) = ",
              loc.sizes().slice(0, 5), ", got ", attn.sizes());
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "m2fsim_msda: sampling_locations ", loc.sizes(),
              " disagrees with value ", value.sizes(), " on batch or heads");
  const int64_t levels = loc.size(3);
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == levels && shapes.size(1) == 2,
              "m2fsim_msda: spatial_shapes must be (levels=", levels, ", 2), got ",
              shapes.sizes());
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == levels,
              "m2fsim_msda: level_start_index must be (levels=", levels, ",), got ",
              starts.sizes());
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "m2fsim_msda: spatial_shapes and level_start_index must be int64, got ",
              shapes.scalar_type(), " and ", starts.scalar_type());
  const at::ScalarType vt = value.scalar_type();
  TORCH_CHECK(vt == at::kDouble || vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16,
              "m2fsim_msda: value must be float64, float32, float16 or bfloat16, got ", vt);
  const at::ScalarType acc = acc_type_of(vt);
  TORCH_CHECK(loc.scalar_type() == acc && attn.scalar_type() == acc,
              "m2fsim_msda: with ", vt, " value, sampling_locations and attention_weights must be ",
              acc, ", got ", loc.scalar_type(), " and ", attn.scalar_type());
  const at::Device dev = value.device();
  TORCH_CHECK(dev.is_cpu() || dev.is_cuda(), "m2fsim_msda: unsupported device ", dev);
  const std::vector<std::pair<const char*, const at::Tensor*>> named = {
      {"value", &value}, {"spatial_shapes", &shapes}, {"level_start_index", &starts},
      {"sampling_locations", &loc}, {"attention_weights", &attn}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == dev, "m2fsim_msda: ", name, " is on ", t->device(),
                " but value is on ", dev);
    TORCH_CHECK(t->is_contiguous(), "m2fsim_msda: ", name, " must be contiguous");
  }
  if (dev.is_cpu()) {  // on the GPU this check would cost a device synchronisation
    const auto hw = shapes.accessor<int64_t, 2>();
    const auto st = starts.accessor<int64_t, 1>();
    int64_t pos = 0;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t h = hw[l][0], w = hw[l][1];
      TORCH_CHECK(h > 0 && w > 0, "m2fsim_msda: spatial_shapes[", l, "] = (", h, ", ", w,
                  ") must be positive");
      TORCH_CHECK(st[l] == pos, "m2fsim_msda: level_start_index[", l, "] = ", st[l],
                  ", expected ", pos);
      pos += h * w;
    }
    TORCH_CHECK(pos == value.size(1), "m2fsim_msda: spatial_shapes cover ", pos,
                " positions but value has S = ", value.size(1));
  }
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                   const at::Tensor& loc, const at::Tensor& attn, std::optional<at::Tensor> out) {
  check_inputs(value, shapes, starts, loc, attn);
  const std::vector<int64_t> out_shape = {value.size(0), loc.size(1),
                                          value.size(2) * value.size(3)};
  at::Tensor result;
  if (out.has_value()) {
    result = *out;
    TORCH_CHECK(result.sizes() == at::IntArrayRef(out_shape), "m2fsim_msda: out must be ",
                at::IntArrayRef(out_shape), ", got ", result.sizes());
    TORCH_CHECK(result.scalar_type() == value.scalar_type() &&
                    result.device() == value.device() && result.is_contiguous(),
                "m2fsim_msda: out must be a contiguous ", value.scalar_type(), " tensor on ",
                value.device());
  } else {
    result = at::empty(out_shape, value.options());
  }
  if (value.is_cuda()) {
    msda_forward_cuda(value, shapes, starts, loc, attn, result);
  } else {
    msda_forward_cpu(value, shapes, starts, loc, attn, result);
  }
  return result;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& value,
                                 const at::Tensor& shapes, const at::Tensor& starts,
                                 const at::Tensor& loc, const at::Tensor& attn) {
  check_inputs(value, shapes, starts, loc, attn);
  const std::vector<int64_t> out_shape = {value.size(0), loc.size(1),
                                          value.size(2) * value.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) &&
                  grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.device() == value.device() && grad_out.is_contiguous(),
              "m2fsim_msda: grad_output must be a contiguous ", value.scalar_type(), " tensor ",
              at::IntArrayRef(out_shape), " on ", value.device(), ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes(), " on ", grad_out.device());
  if (value.is_cuda()) {
    return msda_backward_cuda(grad_out, value, shapes, starts, loc, attn);
  }
  return msda_backward_cpu(grad_out, value, shapes, starts, loc, attn);
}

}  // namespace
}  // namespace m2fsim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "Multi-scale deformable attention (mask2former-sim): CUDA kernels and a host "
      "implementation sharing the same sampling code.";
  m.def("forward", &m2fsim::forward,
        "Output (N, Lq, heads * dim) in value's dtype; writes into `out` when given.",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("out") = py::none());
  m.def("backward", &m2fsim::backward,
        "Returns [grad_value, grad_sampling_locations, grad_attention_weights].",
        py::arg("grad_output"), py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
}

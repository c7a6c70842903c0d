// Per-channel bilinear sampling shared by the CUDA kernels and the host implementation.
//
// Conventions (identical to grid_sample with align_corners=False, padding_mode="zeros"):
// a normalised location u in [0, 1] on an axis of `size` pixels maps to the pixel
// coordinate u * size - 0.5; the four surrounding pixels are blended bilinearly and a
// corner outside the map contributes zero (to the value and to every gradient).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace m2fsim {

C10_HOST_DEVICE inline float floor_of(float v) { return floorf(v); }
C10_HOST_DEVICE inline double floor_of(double v) { return floor(v); }

// Integer top-left corner and fractional offsets of pixel coordinate (y, x) on an h x w
// map. Returns false when no corner can lie inside (this also rejects NaN and inf before
// any float -> int conversion). y == -1 exactly is kept: the value there is 0, but the
// gradient with respect to y is not (the lower corner row is inside).
template <typename acc_t>
C10_HOST_DEVICE inline bool corner_of(acc_t y, acc_t x, int64_t h, int64_t w, int64_t& y0,
                                      int64_t& x0, acc_t& ly, acc_t& lx) {
  if (!(y >= acc_t(-1) && x >= acc_t(-1) && y < acc_t(h) && x < acc_t(w))) {
    return false;
  }
  const acc_t fy = floor_of(y);
  const acc_t fx = floor_of(x);
  y0 = static_cast<int64_t>(fy);
  x0 = static_cast<int64_t>(fx);
  ly = y - fy;
  lx = x - fx;
  return true;
}

// Bilinear sample of one channel. `base` points at pixel (0, 0) of the level for the
// wanted (batch, head, channel); consecutive pixels are `stride` elements apart.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t sample_bilinear(const scalar_t* base, int64_t stride, int64_t h,
                                             int64_t w, acc_t y, acc_t x) {
  int64_t y0, x0;
  acc_t ly, lx;
  if (!corner_of(y, x, h, w, y0, x0, ly, lx)) {
    return acc_t(0);
  }
  const acc_t hy = acc_t(1) - ly;
  const acc_t hx = acc_t(1) - lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < h, left = x0 >= 0, right = x0 + 1 < w;
  const int64_t i00 = (y0 * w + x0) * stride;
  acc_t v = acc_t(0);
  if (top && left) v += hy * hx * static_cast<acc_t>(base[i00]);
  if (top && right) v += hy * lx * static_cast<acc_t>(base[i00 + stride]);
  if (bottom && left) v += ly * hx * static_cast<acc_t>(base[i00 + w * stride]);
  if (bottom && right) v += ly * lx * static_cast<acc_t>(base[i00 + (w + 1) * stride]);
  return v;
}

// Backward of sample_bilinear for one channel. Adds g * (corner weight) to the value
// gradient of each inside corner through `add(ptr, amount)` (an atomic add on the GPU),
// sets dy / dx to the derivative of the sampled value with respect to the pixel
// coordinates y / x, and returns the sampled value.
template <typename scalar_t, typename acc_t, typename AddFn>
C10_HOST_DEVICE inline acc_t sample_bilinear_backward(const scalar_t* base, acc_t* grad_base,
                                                      int64_t stride, int64_t h, int64_t w,
                                                      acc_t y, acc_t x, acc_t g, acc_t& dy,
                                                      acc_t& dx, const AddFn& add) {
  dy = acc_t(0);
  dx = acc_t(0);
  int64_t y0, x0;
  acc_t ly, lx;
  if (!corner_of(y, x, h, w, y0, x0, ly, lx)) {
    return acc_t(0);
  }
  const acc_t hy = acc_t(1) - ly;
  const acc_t hx = acc_t(1) - lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < h, left = x0 >= 0, right = x0 + 1 < w;
  const int64_t i00 = (y0 * w + x0) * stride;
  acc_t v = acc_t(0);
  if (top && left) {
    const acc_t c = static_cast<acc_t>(base[i00]);
    v += hy * hx * c;
    dy -= hx * c;
    dx -= hy * c;
    add(grad_base + i00, g * hy * hx);
  }
  if (top && right) {
    const int64_t i = i00 + stride;
    const acc_t c = static_cast<acc_t>(base[i]);
    v += hy * lx * c;
    dy -= lx * c;
    dx += hy * c;
    add(grad_base + i, g * hy * lx);
  }
  if (bottom && left) {
    const int64_t i = i00 + w * stride;
    const acc_t c = static_cast<acc_t>(base[i]);
    v += ly * hx * c;
    dy += hx * c;
    dx -= ly * c;
    add(grad_base + i, g * ly * hx);
  }
  if (bottom && right) {
    const int64_t i = i00 + (w + 1) * stride;
    const acc_t c = static_cast<acc_t>(base[i]);
    v += ly * lx * c;
    dy += lx * c;
    dx += ly * c;
    add(grad_base + i, g * ly * lx);
  }
  return v;
}

// Sizes of one call: value (n, s, m, d), locations (n, lq, m, l, p, 2).
struct MsdaSizes {
  int64_t n, s, m, d, lq, l, p;
};

}  // namespace m2fsim

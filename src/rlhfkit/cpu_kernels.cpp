// rlhfkit's CPU kernels, built on first use by rlhfkit.cpu_kernels (torch.utils.cpp_extension).
//
// int8_linear fuses what the int8 rollout copy's linear layer does in eager PyTorch (per-row
// symmetric quantisation of the input, the integer product, the rescaling) into one call, and
// optionally what comes before the product in a decoder layer (silu(gate) * up, an RMS norm): at
// one row a decode step's ~120 products spend more time dispatching the small kernels around each
// product than in the product itself. Its results equal the eager layer's bit for bit, except
// with the norm: up to float rounding there (its sum runs in another order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

// Nearest integer, ties to even (as torch.round), for |value| < 2^22: adding and subtracting
// 1.5 * 2^23 leaves no fraction bits, so the default rounding mode rounds; unlike a call to
// nearbyint the compiler vectorises it.
inline float round_half_even(float value) {
  constexpr float shift = 12582912.0f;
  return (value + shift) - shift;
}

// The data of an optional float32 vector of `size` values (contiguous already: the copy's own
// tensors), or null.
const float* per_channel(const std::optional<at::Tensor>& values, int64_t size, const char* what) {
  if (!values.has_value()) return nullptr;
  TORCH_CHECK(values->numel() == size && values->scalar_type() == at::kFloat && values->is_contiguous(),
              "int8_linear: one float32 ", what, " per channel");
  return values->data_ptr<float>();
}

// (rows, in) float32 inputs -> (rows, out) float32. Each row, in this order: gated: the row is
// [gate | up] and becomes silu(gate) * up (half its width); norm_weight: RMS-normed,
// x / sqrt(mean(x^2) + eps) * norm_weight; inverse: times inverse per input channel; then
// quantised to int8 with scale max|row| / 127 (at least 1e-12 / 127), multiplied by the int8
// weight (out, in) with int32 sums, rescaled by row scale * weight_scale [+ bias].
at::Tensor int8_linear(const at::Tensor& inputs, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& inverse,
                       const std::optional<at::Tensor>& norm_weight, double eps, bool gated) {
  TORCH_CHECK(inputs.dim() == 2 && inputs.scalar_type() == at::kFloat, "int8_linear: a float32 (rows, in) input");
  const at::Tensor rows_in = inputs.contiguous();
  const int64_t rows = rows_in.size(0), read = rows_in.size(1), width = gated ? read / 2 : read;
  const int64_t outputs = weight.size(0);
  TORCH_CHECK(!gated || read % 2 == 0, "int8_linear: a gated input holds gate and up side by side");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == width,
              "int8_linear: an int8 (out, in) weight");
  TORCH_CHECK(weight_scale.numel() == outputs && weight_scale.scalar_type() == at::kFloat,
              "int8_linear: one float32 scale per output channel");
  const at::Tensor channel_scale = weight_scale.contiguous();
  at::Tensor quantized = at::empty({rows, width}, rows_in.options().dtype(at::kChar));
  std::vector<float> row_scale(rows);
  const float* source = rows_in.data_ptr<float>();
  const float* divide = per_channel(inverse, width, "inverse factor");
  const float* norm = per_channel(norm_weight, width, "norm weight");
  const bool staged = gated || divide != nullptr || norm != nullptr;
  // ATen's silu (vectorised exp), the very values eager silu(gate) gives
  const at::Tensor activated = gated ? at::silu(rows_in.narrow(1, 0, width)).contiguous() : at::Tensor();
  const float* activation = gated ? activated.data_ptr<float>() : nullptr;
  int8_t* target = quantized.data_ptr<int8_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> staging(staged ? width : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = source + r * read;
      if (staged) {
        for (int64_t j = 0; j < width; ++j) {
          staging[j] = gated ? activation[r * width + j] * row[width + j] : row[j];
        }
        if (norm != nullptr) {
          double squares = 0.0;
          for (int64_t j = 0; j < width; ++j) squares += static_cast<double>(staging[j]) * staging[j];
          const float rescale =
              1.0f / std::sqrt(static_cast<float>(squares / static_cast<double>(width)) + static_cast<float>(eps));
          for (int64_t j = 0; j < width; ++j) staging[j] = staging[j] * rescale * norm[j];
        }
        if (divide != nullptr) {
          for (int64_t j = 0; j < width; ++j) staging[j] *= divide[j];
        }
        row = staging.data();
      }
      float largest = 0.0f;
      for (int64_t j = 0; j < width; ++j) largest = std::max(largest, std::fabs(row[j]));
      const float scale = std::max(largest, 1e-12f) / 127.0f;
      int8_t* quantized_row = target + r * width;
      for (int64_t j = 0; j < width; ++j) {
        quantized_row[j] = static_cast<int8_t>(static_cast<int32_t>(round_half_even(row[j] / scale)));
      }
      row_scale[r] = scale;
    }
  });
  const at::Tensor sums = at::_int_mm(quantized, weight.t());
  at::Tensor output = at::empty({rows, outputs}, rows_in.options());
  const int32_t* sum = sums.data_ptr<int32_t>();
  const float* channel = channel_scale.data_ptr<float>();
  const float* offset = per_channel(bias, outputs, "bias");
  float* result = output.data_ptr<float>();
  // columns split among threads, each running over every row: the inner loop vectorises
  at::parallel_for(0, outputs, std::max<int64_t>(1, 32768 / std::max<int64_t>(rows, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* sum_row = sum + r * outputs;
      float* result_row = result + r * outputs;
      const float scale = row_scale[r];
      for (int64_t c = begin; c < end; ++c) result_row[c] = static_cast<float>(sum_row[c]) * (scale * channel[c]);
      if (offset != nullptr) {
        for (int64_t c = begin; c < end; ++c) result_row[c] += offset[c];
      }
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY(rlhfkit_cpu, m) {
  m.def(
      "int8_linear(Tensor inputs, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor? inverse, "
      "Tensor? norm_weight=None, float eps=0.0, bool gated=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhfkit_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }

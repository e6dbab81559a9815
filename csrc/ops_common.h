// Argument checking and output allocation of the fused ops, shared by the CPU and CUDA
// implementations: every bad input is rejected here, on the host, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <vector>

#include "step_params.h"

namespace agf {

enum class OpKind { kEuler, kHeun, kChurn, kNormal };

// `scalars` (optional, euler/heun): float64 [5] = [w, t_hat, t_next, churn_scale, churn_stream] on
// the device of x_hat; when given, the kernels read those values from it instead of the double
// arguments (see StepParams::scalars). Its values are not checked (they may be on the GPU).
//
// A validated op: the kernel arguments, the element types and the freshly allocated outputs.
// prepare_euler with write_d = false returns d as a 0-element tensor of the state dtype (shape
// [0]) and leaves params.out_slope null: the kernels then never store d.
struct Launch {
  OpKind kind;
  StepParams params;
  DType state = DType::kFloat32;
  DType net = DType::kFloat32;
  std::vector<at::Tensor> outputs;
};

Launch prepare_euler(const at::Tensor& x_hat, const at::Tensor& D_main, const c10::optional<at::Tensor>& D_guide,
                     double w, double t_hat, double t_next, const c10::optional<at::Tensor>& seeds,
                     double churn_scale, int64_t churn_stream, c10::optional<at::ScalarType> cast_dtype,
                     bool write_d, const c10::optional<at::Tensor>& scalars = c10::nullopt);

Launch prepare_heun(const at::Tensor& x_hat, const at::Tensor& d, const at::Tensor& x_next, const at::Tensor& D_main,
                    const c10::optional<at::Tensor>& D_guide, double w, double t_hat, double t_next,
                    const c10::optional<at::Tensor>& seeds, double churn_scale, int64_t churn_stream,
                    const c10::optional<at::Tensor>& scalars = c10::nullopt);

Launch prepare_churn(const at::Tensor& x, double scale, const c10::optional<at::Tensor>& seeds, int64_t stream,
                     const c10::optional<at::Tensor>& eps);

Launch prepare_normal(const at::Tensor& seeds, int64_t numel, int64_t stream, at::ScalarType dtype);

// Raw Philox4x32-10 words (known-answer tests): counter int64 [N, 4] and key int64 [N, 2] holding
// uint32 values; returns int64 [N, 4] (allocated here, after the checks).
at::Tensor prepare_philox_words(const at::Tensor& counter, const at::Tensor& key);

// Outputs of a launch as the op's return value.
inline std::tuple<at::Tensor, at::Tensor> two_outputs(const Launch& l) { return {l.outputs[0], l.outputs[1]}; }
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> three_outputs(const Launch& l) {
  return {l.outputs[0], l.outputs[1], l.outputs[2]};
}

}  // namespace agf

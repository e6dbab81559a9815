// CUDA implementation of the fused sampler ops (schemas in cpu_ops.cpp). Compiled only in a CUDA
// build (AGF_WITH_CUDA); the kernels themselves are in csrc/cuda/step_kernels.cu.
//
// Every check runs on the host before the launch; the launch goes to the current stream of the
// tensors' device; nothing synchronises and nothing is allocated besides the outputs, so the ops
// can be recorded in a CUDA graph.
#ifdef AGF_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/step_kernels.h"
#include "ops_common.h"

namespace agf {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

void run_cuda(const Launch& l, cuda::StepKernel kind, const at::Tensor& ref) {
  const int device = ref.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(cuda::launch_step(kind, l.params, l.state, l.net, device, stream));
}

std::tuple<at::Tensor, at::Tensor> euler_step_cuda(const at::Tensor& x_hat, const at::Tensor& D_main,
                                                   const c10::optional<at::Tensor>& D_guide, double w, double t_hat,
                                                   double t_next, const c10::optional<at::Tensor>& seeds,
                                                   double churn_scale, int64_t churn_stream, bool write_d,
                                                   const c10::optional<at::Tensor>& scalars) {
  check_cuda(x_hat, "x_hat");
  const c10::cuda::CUDAGuard guard(x_hat.device());
  Launch l = prepare_euler(x_hat, D_main, D_guide, w, t_hat, t_next, seeds, churn_scale, churn_stream, c10::nullopt,
                           write_d, scalars);
  run_cuda(l, cuda::StepKernel::kEuler, x_hat);
  return two_outputs(l);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> euler_step_cast_cuda(const at::Tensor& x_hat,
                                                                    const at::Tensor& D_main,
                                                                    const c10::optional<at::Tensor>& D_guide,
                                                                    double w, double t_hat, double t_next,
                                                                    at::ScalarType cast_dtype) {
  check_cuda(x_hat, "x_hat");
  const c10::cuda::CUDAGuard guard(x_hat.device());
  Launch l = prepare_euler(x_hat, D_main, D_guide, w, t_hat, t_next, c10::nullopt, 0.0, 0, cast_dtype, true);
  run_cuda(l, cuda::StepKernel::kEuler, x_hat);
  return three_outputs(l);
}

at::Tensor heun_step_cuda(const at::Tensor& x_hat, const at::Tensor& d, const at::Tensor& x_next,
                          const at::Tensor& D_main, const c10::optional<at::Tensor>& D_guide, double w, double t_hat,
                          double t_next, const c10::optional<at::Tensor>& seeds, double churn_scale,
                          int64_t churn_stream, const c10::optional<at::Tensor>& scalars) {
  check_cuda(x_hat, "x_hat");
  const c10::cuda::CUDAGuard guard(x_hat.device());
  Launch l = prepare_heun(x_hat, d, x_next, D_main, D_guide, w, t_hat, t_next, seeds, churn_scale, churn_stream,
                          scalars);
  run_cuda(l, cuda::StepKernel::kHeun, x_hat);
  return l.outputs[0];
}

at::Tensor churn_cuda(const at::Tensor& x, double scale, const c10::optional<at::Tensor>& seeds, int64_t stream,
                      const c10::optional<at::Tensor>& eps) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Launch l = prepare_churn(x, scale, seeds, stream, eps);
  run_cuda(l, cuda::StepKernel::kChurn, x);
  return l.outputs[0];
}

at::Tensor philox_normal_cuda(const at::Tensor& seeds, int64_t numel, int64_t stream, at::ScalarType dtype) {
  check_cuda(seeds, "seeds");
  const c10::cuda::CUDAGuard guard(seeds.device());
  Launch l = prepare_normal(seeds, numel, stream, dtype);
  run_cuda(l, cuda::StepKernel::kNormal, seeds);
  return l.outputs[0];
}

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_cuda(counter, "counter");
  const c10::cuda::CUDAGuard guard(counter.device());
  at::Tensor out = prepare_philox_words(counter, key);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(counter.device().index()).stream();
  C10_CUDA_CHECK(cuda::launch_philox_words(counter.data_ptr<int64_t>(), key.data_ptr<int64_t>(),
                                           out.data_ptr<int64_t>(), counter.size(0), stream));
  return out;
}

}  // namespace
}  // namespace agf

TORCH_LIBRARY_IMPL(autoguide_fast, CUDA, m) {
  m.impl("euler_step", &agf::euler_step_cuda);
  m.impl("euler_step_cast", &agf::euler_step_cast_cuda);
  m.impl("heun_step", &agf::heun_step_cuda);
  m.impl("churn", &agf::churn_cuda);
  m.impl("philox_normal", &agf::philox_normal_cuda);
  m.impl("philox4x32", &agf::philox4x32_cuda);
}

#endif  // AGF_WITH_CUDA

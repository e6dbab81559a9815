// The fused sampler ops: schemas (declared once, for every device) and the CPU implementation.
//
// Ops (namespace autoguide_fast; the fake/meta implementations live in
// autoguide_fast/ops/extension_ops.py):
//   euler_step       first evaluation of a step, EDM Algorithm 2 lines 7-8 with the guided
//                    denoiser D_w = D0 + w (D1 - D0); optional fused churn of the next step;
//                    write_d=False skips the store of d (returned as a 0-element tensor) when no
//                    Heun correction needs it.
//   euler_step_cast  the same, plus x_next already cast to the networks' input dtype.
//   heun_step        Heun correction, lines 9-11; optional fused churn of the next step.
//   churn            line 5 on its own, x + scale eps with explicit or seeded eps.
//   philox_normal    the seeded noise alone (autoguide_fast/noise.py's specification).
//   philox4x32       raw Philox4x32-10 words, for known-answer tests of the generator.
// An absent D_guide means an unguided evaluation (the guide output is never read).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>

#include "cpu_kernels.h"
#include "ops_common.h"
#include "step_math.h"

namespace agf {
namespace {

std::atomic<const KernelTable*> g_cpu_table{nullptr};

const KernelTable& cpu_table() {
  const KernelTable* t = g_cpu_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = cpu_kernels_avx2();
    if (t == nullptr) t = &cpu_kernels_baseline();
    g_cpu_table.store(t, std::memory_order_release);
  }
  return *t;
}

// Elements per task: plain ops are memory-bound (large grains keep threading overhead away from
// small tensors); the noise ops spend ~50 cycles per element in log/sin/cos.
constexpr int64_t kGrainPlain = 1 << 15;
constexpr int64_t kGrainNoise = 1 << 11;

void run_cpu(const Launch& l) {
  // Host memory: the values of a `scalars` tensor are simply read into the fields here.
  StepParams p = l.params;
  if (p.numel == 0) return;
  if (p.scalars != nullptr) {
    const double stream = p.scalars[4];  // On the host here: checked, as the churn_stream argument is.
    TORCH_CHECK(stream >= 0.0 && stream < 4294967296.0 && stream == std::floor(stream),
                "scalars[4]: expected a Philox stream, an integer in [0, 2^32), got ", stream);
    const StepScalars s = step_scalars(p);
    p.w = s.w;
    p.t_hat = s.t_hat;
    p.t_next = s.t_next;
    p.scale = s.scale;
    p.stream = s.stream;
    p.scalars = nullptr;
  }
  const KernelTable& table = cpu_table();
  const int s = static_cast<int>(l.state);
  ChunkFn fn = nullptr;
  switch (l.kind) {
    case OpKind::kEuler: fn = table.euler[s][static_cast<int>(l.net)]; break;
    case OpKind::kHeun: fn = table.heun[s][static_cast<int>(l.net)]; break;
    case OpKind::kChurn: fn = table.churn[s]; break;
    case OpKind::kNormal: fn = table.normal[s]; break;
  }
  const int64_t grain = p.seeds != nullptr ? kGrainNoise : kGrainPlain;
  at::parallel_for(0, p.numel, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> euler_step_cpu(const at::Tensor& x_hat, const at::Tensor& D_main,
                                                  const c10::optional<at::Tensor>& D_guide, double w, double t_hat,
                                                  double t_next, const c10::optional<at::Tensor>& seeds,
                                                  double churn_scale, int64_t churn_stream, bool write_d,
                                                  const c10::optional<at::Tensor>& scalars) {
  Launch l = prepare_euler(x_hat, D_main, D_guide, w, t_hat, t_next, seeds, churn_scale, churn_stream, c10::nullopt,
                           write_d, scalars);
  run_cpu(l);
  return two_outputs(l);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> euler_step_cast_cpu(const at::Tensor& x_hat, const at::Tensor& D_main,
                                                                   const c10::optional<at::Tensor>& D_guide, double w,
                                                                   double t_hat, double t_next,
                                                                   at::ScalarType cast_dtype) {
  Launch l = prepare_euler(x_hat, D_main, D_guide, w, t_hat, t_next, c10::nullopt, 0.0, 0, cast_dtype, true);
  run_cpu(l);
  return three_outputs(l);
}

at::Tensor heun_step_cpu(const at::Tensor& x_hat, const at::Tensor& d, const at::Tensor& x_next,
                         const at::Tensor& D_main, const c10::optional<at::Tensor>& D_guide, double w, double t_hat,
                         double t_next, const c10::optional<at::Tensor>& seeds, double churn_scale,
                         int64_t churn_stream, const c10::optional<at::Tensor>& scalars) {
  Launch l = prepare_heun(x_hat, d, x_next, D_main, D_guide, w, t_hat, t_next, seeds, churn_scale, churn_stream,
                          scalars);
  run_cpu(l);
  return l.outputs[0];
}

at::Tensor churn_cpu(const at::Tensor& x, double scale, const c10::optional<at::Tensor>& seeds, int64_t stream,
                     const c10::optional<at::Tensor>& eps) {
  Launch l = prepare_churn(x, scale, seeds, stream, eps);
  run_cpu(l);
  return l.outputs[0];
}

at::Tensor philox_normal_cpu(const at::Tensor& seeds, int64_t numel, int64_t stream, at::ScalarType dtype) {
  Launch l = prepare_normal(seeds, numel, stream, dtype);
  run_cpu(l);
  return l.outputs[0];
}

// Words are taken mod 2^32 (the low 32 bits of each int64), as uint32 values.
at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  at::Tensor out = prepare_philox_words(counter, key);
  const int64_t* c = counter.data_ptr<int64_t>();
  const int64_t* k = key.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < counter.size(0); ++i) {
    const Words4 w = philox4x32_10(static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                                   static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3]),
                                   static_cast<uint32_t>(k[2 * i]), static_cast<uint32_t>(k[2 * i + 1]));
    for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(w.r[j]);
  }
  return out;
}

}  // namespace

// Which CPU kernel variant runs ("avx2+fma" or "baseline"); tests switch to exercise both.
std::string cpu_kernels_isa() { return cpu_table().isa; }

bool set_cpu_kernels_isa(const std::string& isa) {
  if (isa == "baseline") {
    g_cpu_table.store(&cpu_kernels_baseline(), std::memory_order_release);
    return true;
  }
  if (isa == "avx2+fma") {
    const KernelTable* t = cpu_kernels_avx2();
    if (t == nullptr) return false;
    g_cpu_table.store(t, std::memory_order_release);
    return true;
  }
  TORCH_CHECK(false, "isa: expected 'baseline' or 'avx2+fma', got '", isa, "'");
  return false;
}

}  // namespace agf

TORCH_LIBRARY(autoguide_fast, m) {
  // The fake (meta) implementations are registered in Python; torch imports this module when it
  // needs them (torch.compile, opcheck) and the ops were reached without it.
  m.set_python_module("autoguide_fast.ops.extension_ops");
  // Scalars are the plan's values of the state dtype (exact in float64); the kernels round them
  // to the state dtype and form t_next - t_hat there, as the reference's 0-dim tensors do.
  // `scalars` (float64 [5] = [w, t_hat, t_next, churn_scale, churn_stream] on the op's device),
  // when given, replaces those five arguments: the kernels read it, so a captured CUDA graph can
  // be replayed for another step after the values in it were updated. The double `w` is then
  // unused; an absent D_guide / seeds still decides unguided / no churn.
  m.def(
      "euler_step(Tensor x_hat, Tensor D_main, Tensor? D_guide, float w, float t_hat, float t_next, "
      "Tensor? seeds=None, float churn_scale=0., int churn_stream=0, bool write_d=True, Tensor? scalars=None) "
      "-> (Tensor d, Tensor x_next)");
  m.def(
      "euler_step_cast(Tensor x_hat, Tensor D_main, Tensor? D_guide, float w, float t_hat, float t_next, "
      "ScalarType cast_dtype) -> (Tensor d, Tensor x_next, Tensor x_next_cast)");
  m.def(
      "heun_step(Tensor x_hat, Tensor d, Tensor x_next, Tensor D_main, Tensor? D_guide, float w, float t_hat, "
      "float t_next, Tensor? seeds=None, float churn_scale=0., int churn_stream=0, Tensor? scalars=None) -> Tensor");
  m.def("churn(Tensor x, float scale, Tensor? seeds=None, int stream=0, Tensor? eps=None) -> Tensor");
  m.def("philox_normal(Tensor seeds, int numel, int stream, ScalarType dtype) -> Tensor");
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
}

TORCH_LIBRARY_IMPL(autoguide_fast, CPU, m) {
  m.impl("euler_step", &agf::euler_step_cpu);
  m.impl("euler_step_cast", &agf::euler_step_cast_cpu);
  m.impl("heun_step", &agf::heun_step_cpu);
  m.impl("churn", &agf::churn_cpu);
  m.impl("philox_normal", &agf::philox_normal_cpu);
  m.impl("philox4x32", &agf::philox4x32_cpu);
}

// Validation and allocation shared by the CPU and CUDA implementations of the fused ops.
#include "ops_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <string>

namespace agf {
namespace {

// The state (x_hat, d, x_next, eps, outputs) is float32 or float64.
DType state_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, name, ": expected the sampler state dtype float32 or float64, got ", t.scalar_type());
  }
  return DType::kFloat32;  // Unreachable.
}

// Network outputs (and the cast copy of x_next) may also be float16 / bfloat16.
DType net_type(at::ScalarType s, const char* name) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected dtype float32, float64, float16 or bfloat16, got ", s);
  }
  return DType::kFloat32;  // Unreachable.
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (row-major, as the per-image noise "
              "index requires); got strides ", t.strides(), " for shape ", t.sizes(), ". Call .contiguous() first.");
}

// `t` must match `ref` (x_hat) in shape and device; dtype is checked by the caller.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
  check_contiguous(t, name);
}

void check_state_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_like(t, name, ref, ref_name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

uint32_t check_stream(int64_t stream, const char* name) {
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX), name,
              ": expected a Philox stream in [0, 2^32), got ", stream);
  return static_cast<uint32_t>(stream);
}

// Seeds: int64 [B] on the state's device, B = x.size(0); sets the per-image element count.
void check_seeds(const at::Tensor& seeds, const at::Tensor& x, const char* x_name, StepParams& p) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "seeds: expected dtype int64, got ", seeds.scalar_type());
  TORCH_CHECK(seeds.dim() == 1, "seeds: expected a 1-D tensor [B], got shape ", seeds.sizes());
  TORCH_CHECK(seeds.device() == x.device(), "seeds: expected the device of ", x_name, " (", x.device(), "), got ",
              seeds.device());
  TORCH_CHECK(x.dim() >= 1, x_name, ": seeded noise needs a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(seeds.size(0) == x.size(0), "seeds: expected one seed per image (", x.size(0), " for ", x_name,
              " of shape ", x.sizes(), "), got ", seeds.size(0));
  check_contiguous(seeds, "seeds");
  p.seeds = seeds.data_ptr<int64_t>();
  p.image_numel = x.size(0) > 0 ? x.numel() / x.size(0) : 1;
  if (p.image_numel == 0) p.image_numel = 1;  // Empty images: no element is ever visited.
}

at::Tensor empty_state_like(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

// Network outputs: D_main any supported dtype, D_guide (optional) the same dtype.
void check_networks(const at::Tensor& x_hat, const at::Tensor& D_main, const c10::optional<at::Tensor>& D_guide,
                    Launch& l) {
  l.net = net_type(D_main.scalar_type(), "D_main");
  check_like(D_main, "D_main", x_hat, "x_hat");
  l.params.d_main = D_main.data_ptr();
  if (D_guide.has_value()) {
    const at::Tensor& g = *D_guide;
    check_like(g, "D_guide", x_hat, "x_hat");
    TORCH_CHECK(g.scalar_type() == D_main.scalar_type(), "D_guide: expected the dtype of D_main (",
                D_main.scalar_type(), "), got ", g.scalar_type(), " (cast both to the state dtype first)");
    l.params.d_guide = g.data_ptr();
  }
}

void check_state(const at::Tensor& x, const char* name, Launch& l) {
  l.state = state_type(x, name);
  check_contiguous(x, name);
  l.params.numel = x.numel();
}

void set_churn(const c10::optional<at::Tensor>& seeds, const at::Tensor& x, double scale, int64_t stream,
               Launch& l) {
  if (!seeds.has_value()) return;
  check_seeds(*seeds, x, "x_hat", l.params);
  l.params.scale = scale;
  l.params.stream = check_stream(stream, "churn_stream");
}

void set_scalars(const c10::optional<at::Tensor>& scalars, const at::Tensor& x_hat, StepParams& p) {
  if (!scalars.has_value()) return;
  const at::Tensor& s = *scalars;
  TORCH_CHECK(s.scalar_type() == at::kDouble, "scalars: expected dtype float64 ([w, t_hat, t_next, churn_scale, "
              "churn_stream]), got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == 5, "scalars: expected shape [5] ([w, t_hat, t_next, churn_scale, "
              "churn_stream]), got ", s.sizes());
  TORCH_CHECK(s.device() == x_hat.device(), "scalars: expected the device of x_hat (", x_hat.device(), "), got ",
              s.device());
  check_contiguous(s, "scalars");
  p.scalars = s.data_ptr<double>();
}

}  // namespace

Launch prepare_euler(const at::Tensor& x_hat, const at::Tensor& D_main, const c10::optional<at::Tensor>& D_guide,
                     double w, double t_hat, double t_next, const c10::optional<at::Tensor>& seeds,
                     double churn_scale, int64_t churn_stream, c10::optional<at::ScalarType> cast_dtype,
                     bool write_d, const c10::optional<at::Tensor>& scalars) {
  Launch l{OpKind::kEuler, {}, DType::kFloat32, DType::kFloat32, {}};
  check_state(x_hat, "x_hat", l);
  check_networks(x_hat, D_main, D_guide, l);
  set_churn(seeds, x_hat, churn_scale, churn_stream, l);
  set_scalars(scalars, x_hat, l.params);
  l.params.x_hat = x_hat.data_ptr();
  l.params.w = w;
  l.params.t_hat = t_hat;
  l.params.t_next = t_next;
  l.outputs = {write_d ? empty_state_like(x_hat) : at::empty({0}, x_hat.options()), empty_state_like(x_hat)};
  l.params.out_slope = write_d ? l.outputs[0].data_ptr() : nullptr;
  l.params.out_x = l.outputs[1].data_ptr();
  if (cast_dtype.has_value()) {
    l.params.cast_dtype = net_type(*cast_dtype, "cast_dtype");
    l.outputs.push_back(at::empty_like(x_hat, x_hat.options().dtype(*cast_dtype), at::MemoryFormat::Contiguous));
    l.params.out_cast = l.outputs[2].data_ptr();
  }
  return l;
}

Launch prepare_heun(const at::Tensor& x_hat, const at::Tensor& d, const at::Tensor& x_next, const at::Tensor& D_main,
                    const c10::optional<at::Tensor>& D_guide, double w, double t_hat, double t_next,
                    const c10::optional<at::Tensor>& seeds, double churn_scale, int64_t churn_stream,
                    const c10::optional<at::Tensor>& scalars) {
  Launch l{OpKind::kHeun, {}, DType::kFloat32, DType::kFloat32, {}};
  check_state(x_hat, "x_hat", l);
  check_state_like(d, "d", x_hat, "x_hat");
  check_state_like(x_next, "x_next", x_hat, "x_hat");
  check_networks(x_hat, D_main, D_guide, l);
  set_churn(seeds, x_hat, churn_scale, churn_stream, l);
  set_scalars(scalars, x_hat, l.params);
  l.params.x_hat = x_hat.data_ptr();
  l.params.slope = d.data_ptr();
  l.params.x_next = x_next.data_ptr();
  l.params.w = w;
  l.params.t_hat = t_hat;
  l.params.t_next = t_next;
  l.outputs = {empty_state_like(x_hat)};
  l.params.out_x = l.outputs[0].data_ptr();
  return l;
}

Launch prepare_churn(const at::Tensor& x, double scale, const c10::optional<at::Tensor>& seeds, int64_t stream,
                     const c10::optional<at::Tensor>& eps) {
  Launch l{OpKind::kChurn, {}, DType::kFloat32, DType::kFloat32, {}};
  check_state(x, "x", l);
  TORCH_CHECK(seeds.has_value() != eps.has_value(),
              "churn: expected exactly one noise source, seeds (seeded noise) or eps (explicit noise); got ",
              seeds.has_value() ? "both" : "neither");
  if (seeds.has_value()) {
    check_seeds(*seeds, x, "x", l.params);
    l.params.stream = check_stream(stream, "stream");
  } else {
    check_state_like(*eps, "eps", x, "x");
    l.params.eps = eps->data_ptr();
  }
  l.params.x_hat = x.data_ptr();
  l.params.scale = scale;
  l.outputs = {empty_state_like(x)};
  l.params.out_x = l.outputs[0].data_ptr();
  return l;
}

Launch prepare_normal(const at::Tensor& seeds, int64_t numel, int64_t stream, at::ScalarType dtype) {
  Launch l{OpKind::kNormal, {}, DType::kFloat32, DType::kFloat32, {}};
  TORCH_CHECK(numel >= 0, "numel: expected a non-negative element count per image, got ", numel);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype: expected float32 or float64, got ", dtype);
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "seeds: expected dtype int64, got ", seeds.scalar_type());
  TORCH_CHECK(seeds.dim() == 1, "seeds: expected a 1-D tensor [B], got shape ", seeds.sizes());
  l.outputs = {at::empty({seeds.size(0), numel}, seeds.options().dtype(dtype))};
  const at::Tensor& out = l.outputs[0];
  check_state(out, "out", l);
  check_seeds(seeds, out, "out", l.params);
  l.params.out_x = out.data_ptr();
  l.params.stream = check_stream(stream, "stream");
  return l;
}

at::Tensor prepare_philox_words(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.size(1) == 4,
              "counter: expected an int64 tensor [N, 4], got ", counter.scalar_type(), " ", counter.sizes());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.dim() == 2 && key.size(1) == 2,
              "key: expected an int64 tensor [N, 2], got ", key.scalar_type(), " ", key.sizes());
  TORCH_CHECK(key.size(0) == counter.size(0), "key: expected ", counter.size(0), " rows like counter, got ",
              key.size(0));
  TORCH_CHECK(key.device() == counter.device(), "key: expected the device of counter (", counter.device(),
              "), got ", key.device());
  check_contiguous(counter, "counter");
  check_contiguous(key, "key");
  return at::empty_like(counter, at::MemoryFormat::Contiguous);
}

}  // namespace agf

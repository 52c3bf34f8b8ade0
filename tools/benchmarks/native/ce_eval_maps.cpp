// A measurement prototype for tools/benchmarks/bench_native.py (not part of
// the cenet_mmdet package): CE's running-statistics eval path, with the
// defaults of the released layer (released whitening, variant 'ce', affine
// BN), made of exactly the ATen ops that CE's Python code runs in the same
// order, called from C++ instead of Python, so that its results are CE's bit
// for bit and the difference in time is what Python costs.
#include <torch/extension.h>

#include <vector>

using at::Tensor;

// Args: the input viewed as (N, G, d, L), then the layer's tensors (BN
// running variance and mean, weight and bias (C,); the running whitening
// (G, d, d); the AII running scale (1,); lambda's logit (1,); the gate's
// weights (C/r, C), LayerNorm weight and bias (C/r,), (C, C/r)), the BN and
// LayerNorm epsilons and CE.UNSHIFTED_MEAN_RATIO.
// Returns {matrix (N, G, d, d), bias (N, G, d, 1), output (N, C, L)}, or
// nothing when some (image, channel) fails CE's accuracy check of the
// unshifted moments (CE then takes its moments about a shift).
std::vector<Tensor> eval_maps(const Tensor& x_grouped, const Tensor& running_var,
                              const Tensor& running_mean, const Tensor& weight,
                              const Tensor& bias, const Tensor& whitening,
                              const Tensor& running_scale, const Tensor& lambda_logit,
                              const Tensor& reduce_weight, const Tensor& norm_weight,
                              const Tensor& norm_bias, const Tensor& expand_weight,
                              double eps, double norm_eps, double mean_ratio) {
  const int64_t n = x_grouped.size(0), groups = x_grouped.size(1);
  const int64_t size = x_grouped.size(2), positions = x_grouped.size(3);
  // moments and their accuracy check (sample_moments, _deviations,
  // _unshifted_is_accurate)
  Tensor sums = x_grouped.sum(-1);
  Tensor squares = at::linalg_vector_norm(x_grouped, 2, {-1}).square();
  Tensor deviations = squares - sums.square() / positions;
  if (!(squares <= deviations * (1 + mean_ratio)).all().item<bool>()) {
    return {};
  }
  // BN scale and shift (_bn_scale, _bn_beta, _eval_maps_about)
  Tensor bn_scale = at::rsqrt(running_var + eps) * weight;
  Tensor scale_g = bn_scale.view({groups, size});
  Tensor bn_shift = at::addcmul(bias.view({groups, size}), scale_g,
                                running_mean.view({groups, size}), -1);
  Tensor instance_var_y =
      (deviations / (positions - 1)).clamp_min(0).flatten(1) * bn_scale.square();
  // the AII gate and the instance scale (_maps, AdaptiveInstanceInverse)
  Tensor lam = at::sigmoid(lambda_logit);
  Tensor hidden = at::layer_norm(at::linear(instance_var_y, reduce_weight),
                                 {reduce_weight.size(0)}, norm_weight, norm_bias, norm_eps);
  Tensor gate = at::sigmoid(at::linear(hidden.relu_(), expand_weight));
  Tensor instance_scale = ((1 - lam) * gate / running_scale).view({-1, groups, size});
  // the fold (fold_channel_equilibrium)
  Tensor scaled_whitening = lam * whitening;
  Tensor eye = at::eye(size, whitening.options());
  Tensor matrix = at::addcmul(scaled_whitening, instance_scale.unsqueeze(-1), eye) *
                  scale_g.unsqueeze(-2);
  Tensor map_bias = at::addcmul(at::matmul(scaled_whitening, bn_shift.unsqueeze(-1)),
                                instance_scale.unsqueeze(-1), bn_shift.unsqueeze(-1));
  // the application (apply_maps): (N*G, d, 1) + (N*G, d, d) @ (N*G, d, L)
  Tensor out = at::empty({n, groups * size, positions}, x_grouped.options());
  Tensor out_flat = out.view({n * groups, size, positions});
  at::baddbmm_out(out_flat, map_bias.reshape({n * groups, size, 1}),
                  matrix.reshape({n * groups, size, size}),
                  x_grouped.reshape({n * groups, size, positions}));
  return {matrix, map_bias, out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("eval_maps", &eval_maps, "CE's eval path in C++ (a measurement prototype)");
}

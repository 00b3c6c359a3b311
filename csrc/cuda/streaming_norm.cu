// CUDA kernels of Streaming Normalization: the ops streaming_norm and
// streaming_norm_backward. Schemas and semantics are in
// csrc/registration.cpp; the CPU kernels, which these mirror, in
// csrc/cpu/streaming_norm.cpp.
//
// They are BatchNorm's launches (batch_norm_passes.cuh) with a finalize
// kernel of their own between the reduction and the element-wise pass, one
// thread per channel (threadIdx.y combining the partials, as BatchNorm's
// finalize kernels do), running the per-channel math of
// common/streaming_norm_math.h:
//
//   streaming_norm           reduce (x: count, mean, M2 per channel) ->
//                            streaming_forward_finalize_kernel (batch mean,
//                            rstd; push into short_stats; s_hat; the
//                            element-wise scale and shift) -> BatchNorm's
//                            forward element-wise kernel centred on mean_hat;
//                            short_count += 1 (an ATen add_ after them).
//   streaming_norm_backward  reduce (x, dy: sum dy, sum dy (x - mean_hat)) ->
//                            streaming_backward_finalize_kernel (g, its push
//                            into grad_short, g_hat, grad_weight, grad_bias,
//                            dx's coefficients) -> BatchNorm's backward
//                            element-wise kernel (when grad_input is wanted);
//                            grad_short_count += 1.
//
// Memory traffic is BatchNorm's: two reads of x (one of x and dy) and a
// write. The histories' counts are read on the device (no host sync). The
// state math runs in double, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "batch_norm_passes.cuh"
#include "common/batch_norm_math.h"
#include "common/streaming_norm_math.h"
#include "common/streaming_norm_plan.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

using at::Tensor;
using T = streaming_state_t;

// A (2, C) history (rows mean and std) and its 0-dim count.
struct HistoryRef {
  StateRef mean, std, count;

  __device__ __forceinline__ StreamingPair<T> load(int64_t c) const {
    return {mean.load<T>(c), std.load<T>(c)};
  }
  __device__ __forceinline__ void store(int64_t c, const StreamingPair<T>& v) const {
    mean.store(c, v.mean);
    std.store(c, v.std);
  }
  __device__ __forceinline__ T count_value() const { return count.load<T>(0); }
};

HistoryRef history_ref(const Tensor& values, const Tensor& count) {
  return {state_ref(values.select(0, 0)), state_ref(values.select(0, 1)), state_ref(count)};
}

// Forward, per channel: the batch's mean and rstd from the partials (biased
// variance over count = N*S values, as BatchNorm's), pushed into the
// short-term history; s_hat's mean and rstd, and the element-wise pass's
// scale = weight * rstd_hat and shift = bias.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) streaming_forward_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    acc_type_of<scalar_t> eps,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    HistoryRef short_history,
    HistoryRef long_history,
    T alpha_long,
    T alpha_short,
    acc_type_of<scalar_t>* __restrict__ mean_out,
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    acc_type_of<scalar_t>* __restrict__ mean_hat_out,
    acc_type_of<scalar_t>* __restrict__ rstd_hat_out,
    acc_type_of<scalar_t>* __restrict__ scale_out,
    acc_type_of<scalar_t>* __restrict__ shift_out) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_partials<MeanM2<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t mean = total.mean;
  const acc_t rstd = rstd_from_var(total.m2 / count, eps);
  StreamingPair<T> short_stats = short_history.load(c);
  const StreamingPair<T> hat =
      streaming_forward_channel(short_stats, long_history.load(c), long_history.count_value() > T(0),
                                short_history.count_value(), mean, rstd, alpha_long, alpha_short);
  short_history.store(c, short_stats);
  const acc_t mean_hat = static_cast<acc_t>(hat.mean);
  const acc_t rstd_hat = acc_t(1) / static_cast<acc_t>(hat.std);
  const auto fc = forward_coefficients(rstd_hat, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
  mean_out[c] = mean;
  rstd_out[c] = rstd;
  mean_hat_out[c] = mean_hat;
  rstd_hat_out[c] = rstd_hat;
  scale_out[c] = fc.scale;
  shift_out[c] = fc.shift;
}

// Backward, per channel: from sum dy and sum dy (x - mean_hat), the
// statistics' gradient g pushed into the short-term gradient history, g_hat,
// grad_weight and grad_bias (when wanted), and dx's coefficients in the
// (6, C) layout of BatchNorm's backward element-wise kernel (BackwardCoef;
// its scale and shift only recompute z for an activation, which there is
// none of).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) streaming_backward_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> mean,
    ChannelParam<scalar_t> rstd,
    ChannelParam<scalar_t> mean_hat,
    ChannelParam<scalar_t> rstd_hat,
    HistoryRef grad_short,
    HistoryRef grad_long,
    T beta_long,
    T beta_short,
    T beta_current,
    ChannelParam<scalar_t> grad_weight,
    ChannelParam<scalar_t> grad_bias,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumPair<acc_t> sums = combine_partials<SumPair<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t w = weight.load(c, acc_t(1));
  const acc_t m_hat = mean_hat.load(c, acc_t(0));
  const acc_t r_hat = rstd_hat.load(c, acc_t(1));
  StreamingPair<T> short_grad = grad_short.load(c);
  const BackwardCoefficients<acc_t> k = streaming_backward_channel(
      short_grad, grad_long.load(c), grad_long.count_value() > T(0), grad_short.count_value(), sums.dz, sums.dz_xc, w,
      m_hat, r_hat, mean.load(c, acc_t(0)), rstd.load(c, acc_t(1)), count, beta_long, beta_short, beta_current);
  grad_short.store(c, short_grad);
  // As BatchNorm's: grad_weight = sum(dy * x_hat), grad_bias = sum(dy).
  if (grad_weight.present()) grad_weight.store(c, sums.dz_xc * r_hat);
  if (grad_bias.present()) grad_bias.store(c, sums.dz);
  store_backward_coef(coef, C, c, m_hat, forward_coefficients(r_hat, w, acc_t(0)), k);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> streaming_norm_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& short_stats, const Tensor& short_count, const Tensor& long_stats, const Tensor& long_count,
    const Tensor& grad_short, const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count,
    double alpha_long, double alpha_short, double /*beta_long*/, double /*beta_short*/, double /*beta_current*/,
    double eps) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_streaming_norm("torchnorm.streaming_norm", input, weight, bias, short_stats, short_count,
                                            long_stats, long_count, grad_short, grad_short_count, grad_long,
                                            grad_long_count, eps);
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  Tensor mean = at::empty({g.C}, acc_options), rstd = at::empty({g.C}, acc_options);
  Tensor mean_hat = at::empty({g.C}, acc_options), rstd_hat = at::empty({g.C}, acc_options);
  Tensor coef = at::empty({2, g.C}, acc_options);  // scale, shift

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.streaming_norm", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    StatsOp<scalar_t> op{p.x.const_data_ptr<scalar_t>()};
    const Tensor partials = launch_reduce(op, g, acc_options, stream);

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(partials.size(1), kThreads);
    streaming_forward_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), g.C, static_cast<acc_t>(g.count_per_channel()),
        static_cast<acc_t>(eps), channel_param<scalar_t>(weight, false), channel_param<scalar_t>(bias, false),
        history_ref(short_stats, short_count), history_ref(long_stats, long_count), T(alpha_long), T(alpha_short),
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), mean_hat.mutable_data_ptr<acc_t>(),
        rstd_hat.mutable_data_ptr<acc_t>(), coef_ptr, coef_ptr + g.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_forward_elementwise<scalar_t>(p, mean_hat.const_data_ptr<acc_t>(), coef_ptr, coef_ptr + g.C, 0.0, stream);
  });
  short_count.add_(1);  // after the finalize kernel read it, in stream order
  return {p.out, mean, rstd, mean_hat, rstd_hat};
}

std::tuple<Tensor, Tensor, Tensor> streaming_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight, const Tensor& mean,
    const Tensor& rstd, const Tensor& mean_hat, const Tensor& rstd_hat, const Tensor& grad_short,
    const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count, double beta_long,
    double beta_short, double beta_current, std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  const BackwardPlan p =
      plan_streaming_norm_backward("torchnorm.streaming_norm_backward", grad_output, input, weight, mean, rstd,
                                   mean_hat, rstd_hat, grad_short, grad_short_count, grad_long, grad_long_count,
                                   output_mask);
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  Tensor coef = at::empty({6, g.C}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.streaming_norm_backward",
                                  [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const auto weight_p = channel_param<scalar_t>(weight, false);
    const auto mean_hat_p = channel_param<scalar_t>(mean_hat, false);
    const auto rstd_hat_p = channel_param<scalar_t>(rstd_hat, false);
    // The history needs both sums whatever the mask.
    GradOp<scalar_t> op{p.x.const_data_ptr<scalar_t>(), p.grad_out.const_data_ptr<scalar_t>(), nullptr, mean_hat_p,
                        rstd_hat_p, weight_p, ChannelParam<scalar_t>{}, Activation::None, acc_t(0)};
    const Tensor partials = launch_reduce(op, g, acc_options, stream);

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(partials.size(1), kThreads);
    streaming_backward_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), g.C, static_cast<acc_t>(g.count_per_channel()), weight_p,
        channel_param<scalar_t>(mean, false), channel_param<scalar_t>(rstd, false), mean_hat_p, rstd_hat_p,
        history_ref(grad_short, grad_short_count), history_ref(grad_long, grad_long_count), T(beta_long),
        T(beta_short), T(beta_current),
        output_mask[1] ? channel_param<scalar_t>(p.grad_weight, true) : ChannelParam<scalar_t>{},
        output_mask[2] ? channel_param<scalar_t>(p.grad_bias, true) : ChannelParam<scalar_t>{}, coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (output_mask[0]) launch_backward_elementwise<scalar_t>(p, nullptr, coef_ptr, acc_t(0), stream);
  });
  grad_short_count.add_(1);  // after the finalize kernel read it, in stream order
  return {p.grad_input, p.grad_weight, p.grad_bias};
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("streaming_norm", TORCH_FN(torchnorm::streaming_norm_cuda));
  m.impl("streaming_norm_backward", TORCH_FN(torchnorm::streaming_norm_backward_cuda));
}

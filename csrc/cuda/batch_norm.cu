// CUDA kernels of torchnorm's BatchNorm ops: batch_norm_train, batch_norm_eval,
// batch_norm_apply (normalize with given mean and rstd) and
// batch_norm_backward. Argument checks, layout classification and output
// allocation are done by plan_forward / plan_apply / plan_backward
// (common/batch_norm_plan.h); the per-element math comes from common/
// (welford.h, batch_norm_math.h, activations.h), so the CPU and CUDA kernels
// compute the same functions; the element-wise walks, coefficient gathers and
// launch helpers from kernel_helpers.cuh, shared with group_norm.cu.
//
// Memory traffic (n = N*C*S elements; per-channel data is O(C) and ignored):
//
//   batch_norm_train: 2 reads of x, 1 write of out (+1 read of residual).
//     1. reduce    read x once. Each thread runs Welford over its elements,
//                  a block Chan-combines its threads into one partial
//                  (count, mean, M2) per channel, written to a workspace.
//     2. finalize  per channel: combine the partials, write mean / rstd,
//                  update the running statistics, and precompute the
//                  normalize coefficients (scale = weight*rstd, shift = bias).
//     3. normalize read x (+ residual), write out = act((x-mean)*scale+shift+r).
//     Reading x once would need it kept on chip between 1 and 3 (a persistent
//     cooperative kernel); x is re-read instead (from L2 when it fits there).
//
//   batch_norm_eval, batch_norm_apply: 1 read of x (+ residual), 1 write of
//     out, after a tiny per-channel kernel that turns the running statistics
//     (or the given mean and rstd) into coefficients.
//
//   batch_norm_backward: reduce pass reads x and dy (+ residual when an
//     activation needs the pre-activation z) for sum(dz) and sum(dz*(x-mean));
//     finalize writes grad_weight / grad_bias and the grad_input coefficients;
//     an element-wise pass reads x, dy (+ residual) and writes grad_input
//     and/or grad_residual. The reduce pass runs only when something needs the
//     sums (grad_weight, grad_bias, or grad_input in training), so an eval-mode
//     grad_input costs a single pass.
//
// Layouts (ChannelGeometry): Planar = (N, C, S) contiguous, Rowwise = (R, C)
// with R = N*S rows (channels_last or 2-D input). The reductions have one
// kernel per layout; the element-wise kernels treat both as a flat array whose
// element e is in channel (e / S) % C (Rowwise is the case S = 1).
//
// Templates: reductions per input dtype x layout x {statistics, gradient
// sums}, element-wise kernels per dtype x {16-byte vector, scalar} x
// {forward, backward}, finalize kernels per dtype (44 kernels in all). The
// parameter dtype (input dtype or float32), the activation and the optional
// tensors are run-time switches: parameters are read once per channel per
// block or thread, and the activation switch is uniform across a launch.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "common/activations.h"
#include "common/batch_norm_plan.h"
#include "common/batch_norm_math.h"
#include "common/sync_batch_norm_math.h"
#include "common/sync_batch_norm_plan.h"
#include "common/welford.h"
#include "batch_norm_passes.cuh"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

// The reduction and element-wise kernels, their launches and the constants
// (kThreads, kUnroll) are in batch_norm_passes.cuh, shared with
// streaming_norm.cu; the finalize kernels below are BatchNorm's own.

// Training forward: batch mean / rstd, running statistics, and the normalize
// coefficients. `count` is N*S, exact, rather than the partials' summed count
// (a float count stops being exact above 2^24).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    acc_type_of<scalar_t> eps,
    acc_type_of<scalar_t> momentum,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    ChannelParam<scalar_t> running_mean,
    ChannelParam<scalar_t> running_var,
    acc_type_of<scalar_t>* __restrict__ mean_out,
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    acc_type_of<scalar_t>* __restrict__ scale_out,
    acc_type_of<scalar_t>* __restrict__ shift_out) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_partials<MeanM2<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t rstd = rstd_from_var(total.m2 / count, eps);  // biased variance normalizes
  mean_out[c] = total.mean;
  rstd_out[c] = rstd;
  const auto fc = forward_coefficients(rstd, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
  scale_out[c] = fc.scale;
  shift_out[c] = fc.shift;
  if (running_mean.present()) {
    acc_t rm = running_mean.load(c, acc_t(0));
    acc_t rv = running_var.load(c, acc_t(1));
    update_running_stats(rm, rv, total.mean, total.m2, count, momentum);
    running_mean.store(c, rm);
    running_var.store(c, rv);
  }
}

// Eval forward: coefficients from given statistics. coef is (3, C): mean,
// scale, shift. `stats` is the running variance (batch_norm_eval), or rstd
// itself when stats_are_rstd (batch_norm_apply).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) eval_coefficients_kernel(
    int64_t C,
    acc_type_of<scalar_t> eps,
    bool stats_are_rstd,
    ChannelParam<scalar_t> running_mean,
    ChannelParam<scalar_t> stats,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t given = stats.load(c, acc_t(1));
  const acc_t rstd = stats_are_rstd ? given : rstd_from_var(given, eps);
  const auto fc = forward_coefficients(rstd, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
  coef[c] = running_mean.load(c, acc_t(0));
  coef[C + c] = fc.scale;
  coef[2 * C + c] = fc.shift;
}


// Backward: grad_weight / grad_bias (when wanted) and the coefficients of the
// element-wise pass (coef, laid out as BackwardCoef). With splits == 0 (no reduction
// was needed) the sums are zero, which only the unused training terms read.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    bool training,
    ChannelParam<scalar_t> mean,
    ChannelParam<scalar_t> rstd,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    ChannelParam<scalar_t> grad_weight,
    ChannelParam<scalar_t> grad_bias,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumPair<acc_t> sums = combine_partials<SumPair<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t m = mean.load(c, acc_t(0));
  const acc_t r = rstd.load(c, acc_t(1));
  const acc_t w = weight.load(c, acc_t(1));
  if (grad_weight.present()) grad_weight.store(c, sums.dz_xc * r);
  if (grad_bias.present()) grad_bias.store(c, sums.dz);
  const auto fc = forward_coefficients(r, w, bias.load(c, acc_t(0)));
  store_backward_coef(coef, C, c, m, fc, backward_coefficients(training, r, w, sums.dz, sums.dz_xc, count));
}

// ---------------------------------------------------------------------------
// SyncBatchNorm's per-rank pieces (docs/sync_batch_norm.md); per-channel math
// from common/sync_batch_norm_math.h, as the CPU kernels.
// ---------------------------------------------------------------------------

// batch_norm_stats: the float64 (3, C) [count; mean; M2] total of a
// reduction's partials, with the exact count.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_total_kernel(
    const acc_t* __restrict__ partials, int64_t splits, int64_t C, int64_t count, double* __restrict__ out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_partials<MeanM2<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;
  out[c] = static_cast<double>(count);
  out[C + c] = static_cast<double>(total.mean);
  out[2 * C + c] = static_cast<double>(total.m2);
}

// batch_norm_gather_stats: one thread per channel merges the W partials in
// order (W is the world size: small), as the CPU kernel. running_mean and
// running_var (acc_t, nullable) are updated in place.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gather_stats_kernel(
    const acc_t* __restrict__ table, int64_t W, int64_t C, acc_t eps, acc_t momentum, acc_t* running_mean,
    acc_t* running_var, acc_t* __restrict__ mean, acc_t* __restrict__ rstd, acc_t* __restrict__ count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bool update = running_mean != nullptr;
  acc_t rm = update ? running_mean[c] : acc_t(0), rv = update ? running_var[c] : acc_t(1);
  const MergedChannel<acc_t> m = finish_merged(merge_partials(table, W, C, c), eps, update, momentum, rm, rv);
  mean[c] = m.mean;
  rstd[c] = m.rstd;
  count[c] = m.count;
  if (update) {
    running_mean[c] = rm;
    running_var[c] = rv;
  }
}

// batch_norm_backward_elemt: the (6, C) BackwardCoef workspace from the
// global statistics and gradient means.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) elemt_coefficients_kernel(
    int64_t C, ChannelParam<scalar_t> mean, ChannelParam<scalar_t> rstd, ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias, ChannelParam<scalar_t> mean_dz, ChannelParam<scalar_t> mean_dz_xhat,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t r = rstd.load(c, acc_t(1));
  const acc_t w = weight.load(c, acc_t(1));
  const auto fc = forward_coefficients(r, w, bias.load(c, acc_t(0)));
  store_backward_coef(coef, C, c, mean.load(c, acc_t(0)), fc,
                      global_backward_coefficients(r, w, mean_dz.load(c, acc_t(0)), mean_dz_xhat.load(c, acc_t(0))));
}


// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    double momentum,
    double eps,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_forward("torchnorm.batch_norm_train", input, weight, bias, running_mean, running_var,
                                     residual, /*training=*/true, eps, std::string(activation));
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  const int64_t count = g.count_per_channel();
  if (count == 0) {
    // Empty batch: no statistics to take, running stats stay as they are.
    return {p.out, at::zeros({g.C}, acc_options), at::zeros({g.C}, acc_options)};
  }
  at::Tensor mean = at::empty({g.C}, acc_options);
  at::Tensor rstd = at::empty({g.C}, acc_options);
  at::Tensor coef = at::empty({2, g.C}, acc_options);  // scale, shift

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_train", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    StatsOp<scalar_t> op{p.x.const_data_ptr<scalar_t>()};
    const at::Tensor partials = launch_reduce(op, g, acc_options, stream);

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(partials.size(1), kThreads);
    stats_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), g.C, static_cast<acc_t>(count),
        static_cast<acc_t>(eps), static_cast<acc_t>(momentum), channel_param<scalar_t>(weight, false),
        channel_param<scalar_t>(bias, false), channel_param<scalar_t>(running_mean, true),
        channel_param<scalar_t>(running_var, true), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
        coef_ptr, coef_ptr + g.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_forward_elementwise<scalar_t>(p, mean.const_data_ptr<acc_t>(), coef_ptr, coef_ptr + g.C, negative_slope,
                                         stream);
  });
  return {p.out, mean, rstd};
}

// act((x - mean) * rstd * weight + bias + residual) into p.out; `stats` is a
// variance, or rstd when stats_are_rstd (see eval_coefficients_kernel).
at::Tensor normalize_with_statistics(const ForwardPlan& p, const at::Tensor& mean, const at::Tensor& stats,
                                     bool stats_are_rstd, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double eps, double negative_slope) {
  if (p.x.numel() == 0) return p.out;
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  at::Tensor coef = at::empty({3, g.C}, acc_options);  // mean, scale, shift

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_eval", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    eval_coefficients_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(g.C, kThreads)), kThreads, 0, stream>>>(
        g.C, static_cast<acc_t>(eps), stats_are_rstd, channel_param<scalar_t>(mean, false),
        channel_param<scalar_t>(stats, false), channel_param<scalar_t>(weight, false),
        channel_param<scalar_t>(bias, false), coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_forward_elementwise<scalar_t>(p, coef_ptr, coef_ptr + g.C, coef_ptr + 2 * g.C, negative_slope, stream);
  });
  return p.out;
}

at::Tensor batch_norm_eval_cuda(
    const at::Tensor& input,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_forward("torchnorm.batch_norm_eval", input, weight, bias, running_mean, running_var,
                                     residual, /*training=*/false, eps, std::string(activation));
  return normalize_with_statistics(p, running_mean, running_var, /*stats_are_rstd=*/false, weight, bias, eps,
                                   negative_slope);
}

at::Tensor batch_norm_apply_cuda(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_apply(input, mean, rstd, weight, bias, residual, std::string(activation));
  return normalize_with_statistics(p, mean, rstd, /*stats_are_rstd=*/true, weight, bias, 0.0, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    bool training,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 4> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  BackwardPlan p = plan_backward("torchnorm.batch_norm_backward", grad_output, input, weight, bias, residual, mean,
                                 rstd, std::string(activation), output_mask);
  const ChannelGeometry& g = p.g;
  const bool want_input = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2],
             want_residual = output_mask[3];
  const auto result = [&] { return std::make_tuple(p.grad_input, p.grad_weight, p.grad_bias, p.grad_residual); };
  const int64_t count = g.count_per_channel();
  if (count == 0) {
    // Sums over an empty batch are zero; grad_input / grad_residual are empty.
    if (want_weight) p.grad_weight.zero_();
    if (want_bias) p.grad_bias.zero_();
    return result();
  }
  if (!(want_input || want_weight || want_bias || want_residual)) return result();

  const bool need_sums = want_weight || want_bias || (training && want_input);
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  at::Tensor coef = at::empty({6, g.C}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_backward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* dy = p.grad_out.const_data_ptr<scalar_t>();
    // The residual only matters through z, which only an activation looks at.
    const scalar_t* res = (p.activation != Activation::None && p.residual.defined())
        ? p.residual.const_data_ptr<scalar_t>()
        : nullptr;
    const auto mean_p = channel_param<scalar_t>(mean, false);
    const auto rstd_p = channel_param<scalar_t>(rstd, false);
    const auto weight_p = channel_param<scalar_t>(weight, false);
    const auto bias_p = channel_param<scalar_t>(bias, false);
    const acc_t slope = static_cast<acc_t>(negative_slope);

    at::Tensor partials;
    if (need_sums) {
      GradOp<scalar_t> op{x, dy, res, mean_p, rstd_p, weight_p, bias_p, p.activation, slope};
      partials = launch_reduce(op, g, acc_options, stream);
    }
    const int64_t splits = partials.defined() ? partials.size(1) : 0;
    const acc_t* partials_ptr = partials.defined() ? partials.const_data_ptr<acc_t>() : nullptr;

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(splits, kThreads);
    grad_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials_ptr, splits, g.C, static_cast<acc_t>(count), training, mean_p, rstd_p, weight_p, bias_p,
        want_weight ? channel_param<scalar_t>(p.grad_weight, true) : ChannelParam<scalar_t>{},
        want_bias ? channel_param<scalar_t>(p.grad_bias, true) : ChannelParam<scalar_t>{}, coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (want_input || want_residual) launch_backward_elementwise<scalar_t>(p, res, coef_ptr, slope, stream);
  });
  return result();
}

at::Tensor batch_norm_stats_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  StatsPlan p = plan_stats(input, weight, bias, running_mean, running_var, residual);
  const int64_t count = p.g.count_per_channel();
  if (count == 0) return p.stats;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_stats", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor partials = launch_reduce(StatsOp<scalar_t>{p.x.const_data_ptr<scalar_t>()}, p.g, acc_options,
                                              stream);
    const dim3 block = finalize_block(partials.size(1), kThreads);
    stats_total_kernel<acc_t><<<finalize_grid(block, p.g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), p.g.C, count, p.stats.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gather_stats_cuda(
    const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor table = plan_gather_stats(stats, running_mean, running_var, eps);
  const int64_t W = table.size(0), C = table.size(2);
  at::Tensor mean = at::empty({C}, table.options()), rstd = at::empty_like(mean), count = at::empty_like(mean);
  // The kernel updates acc-typed contiguous running statistics: the buffers
  // themselves when they are, else copies written back below.
  at::Tensor rm, rv;
  if (running_mean) {
    rm = running_mean->to(table.scalar_type()).contiguous();
    rv = running_var->to(table.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "torchnorm.batch_norm_gather_stats", [&] {
    using acc_t = scalar_t;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    gather_stats_kernel<acc_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        table.const_data_ptr<acc_t>(), W, C, static_cast<acc_t>(eps), static_cast<acc_t>(momentum),
        rm.defined() ? rm.mutable_data_ptr<acc_t>() : nullptr, rv.defined() ? rv.mutable_data_ptr<acc_t>() : nullptr,
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), count.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (running_mean) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {mean, rstd, count};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 2> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  BackwardPlan p = plan_backward_elemt(grad_output, input, weight, bias, residual, mean, rstd, mean_dz,
                                       mean_dz_xhat, std::string(activation), output_mask);
  if (p.x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {p.grad_input, p.grad_residual};
  const int64_t C = p.g.C;
  at::Tensor coef = at::empty({6, C}, p.x.options().dtype(accumulate_type(p.x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_backward_elemt",
                                  [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    elemt_coefficients_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        C, channel_param<scalar_t>(mean, false), channel_param<scalar_t>(rstd, false),
        channel_param<scalar_t>(weight, false), channel_param<scalar_t>(bias, false),
        channel_param<scalar_t>(mean_dz, false), channel_param<scalar_t>(mean_dz_xhat, false), coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* res = (p.activation != Activation::None && p.residual.defined())
        ? p.residual.const_data_ptr<scalar_t>()
        : nullptr;
    launch_backward_elementwise<scalar_t>(p, res, coef_ptr, static_cast<acc_t>(negative_slope), stream);
  });
  return {p.grad_input, p.grad_residual};
}


}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("batch_norm_train", TORCH_FN(torchnorm::batch_norm_train_cuda));
  m.impl("batch_norm_eval", TORCH_FN(torchnorm::batch_norm_eval_cuda));
  m.impl("batch_norm_apply", TORCH_FN(torchnorm::batch_norm_apply_cuda));
  m.impl("batch_norm_backward", TORCH_FN(torchnorm::batch_norm_backward_cuda));
  m.impl("batch_norm_stats", TORCH_FN(torchnorm::batch_norm_stats_cuda));
  m.impl("batch_norm_gather_stats", TORCH_FN(torchnorm::batch_norm_gather_stats_cuda));
  m.impl("batch_norm_backward_elemt", TORCH_FN(torchnorm::batch_norm_backward_elemt_cuda));
}

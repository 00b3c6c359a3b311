#include "common/cosine_norm_plan.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "common/cpu_products.h"
#include "common/input_checks.h"

namespace torchnorm {
namespace {

using at::Tensor;

// A checked call of either op: the contiguous operands and the geometry.
struct CosinePlan {
  const char* op = "";
  bool conv = false;
  Tensor x;       // (N, C, H, W) view of the contiguous input
  Tensor weight;  // contiguous, as given
  std::optional<Tensor> bias;
  CosineGeometry geo;
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  std::vector<int64_t> in_shape;   // the input's shape
  std::vector<int64_t> out_shape;  // the output's shape
  std::vector<int64_t> rx_shape;   // input_rnorm's shape
};

// What both ops check of their weight and bias, and the input's dtype.
void check_operands(const char* op, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_supported_input(op, input);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": expected the weight of dtype ",
              input.scalar_type(), " like the input, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": expected the weight on ", input.device(),
              " like the input, got it on ", weight.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": expected a bias of shape (",
                weight.size(0), ",), one per output channel, got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": expected the bias of dtype ",
                input.scalar_type(), " like the input, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": expected the bias on ", input.device(),
                " like the input, got it on ", bias->device());
  }
}

// One dimension of the window; the output length from the input's.
Window1d window(const char* op, const char* dim, int64_t in, int64_t size, int64_t stride, int64_t padding,
                int64_t dilation) {
  TORCH_CHECK(stride >= 1 && dilation >= 1 && padding >= 0, op, ": expected stride >= 1, dilation >= 1 and "
              "padding >= 0, got stride ", stride, ", padding ", padding, " and dilation ", dilation, " along ", dim);
  const int64_t span = dilation * (size - 1) + 1;
  TORCH_CHECK(in + 2 * padding >= span, op, ": the input's ", dim, " of ", in, " (", in + 2 * padding,
              " padded) is smaller than the dilated kernel's ", span);
  Window1d w;
  w.size = size;
  w.stride = stride;
  w.padding = padding;
  w.dilation = dilation;
  w.in = in;
  w.out = (in + 2 * padding - span) / stride + 1;
  return w;
}

void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", name, " of two values (height, width), got ", v);
}

CosinePlan plan_cosine_linear(const char* op, const Tensor& input, const Tensor& weight,
                              const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": expected a 2-d (out_features, in_features) weight, got shape ",
              weight.sizes());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), op, ": expected an input (*, ", weight.size(1),
              ") whose last dimension is the weight's in_features, got shape ", input.sizes());
  check_operands(op, input, weight, bias);
  CosinePlan plan;
  plan.op = op;
  auto& g = plan.geo;
  g.C = weight.size(1);
  g.O = weight.size(0);
  g.N = 1;  // rows: the product of the leading dimensions
  for (int64_t d = 0; d + 1 < input.dim(); ++d) g.N *= input.size(d);
  plan.x = input.contiguous().view({g.N, g.C, 1, 1});
  plan.weight = weight.contiguous();
  plan.bias = bias;
  plan.in_shape = input.sizes().vec();
  plan.rx_shape = std::vector<int64_t>(plan.in_shape.begin(), plan.in_shape.end() - 1);
  plan.out_shape = plan.rx_shape;
  plan.out_shape.push_back(g.O);
  return plan;
}

CosinePlan plan_cosine_conv2d(const char* op, const Tensor& input, const Tensor& weight,
                              const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, op, ": expected an (N, C, H, W) input, got shape ", input.sizes());
  TORCH_CHECK(groups >= 1, op, ": expected groups >= 1, got ", groups);
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-d (out_channels, in_channels / groups, kh, kw) weight, got "
              "shape ", weight.sizes());
  const int64_t C = input.size(1), O = weight.size(0);
  TORCH_CHECK(C >= 1 && C % groups == 0 && O % groups == 0, op, ": expected in_channels (", C,
              ") >= 1 and out_channels (", O, ") divisible by groups (", groups, ")");
  TORCH_CHECK(weight.size(1) == C / groups && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": expected a weight of shape (", O, ", ", C / groups, ", kh, kw) for ", C, " input channels in ",
              groups, " groups, got ", weight.sizes());
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  check_operands(op, input, weight, bias);
  CosinePlan plan;
  plan.op = op;
  plan.conv = true;
  auto& g = plan.geo;
  g.N = input.size(0);
  g.C = C;
  g.H = input.size(2);
  g.W = input.size(3);
  g.O = O;
  g.G = groups;
  g.rows = window(op, "height", g.H, weight.size(2), stride[0], padding[0], dilation[0]);
  g.cols = window(op, "width", g.W, weight.size(3), stride[1], padding[1], dilation[1]);
  plan.stride = stride.vec();
  plan.padding = padding.vec();
  plan.dilation = dilation.vec();
  plan.x = input.contiguous();
  plan.weight = weight.contiguous();
  plan.bias = bias;
  plan.in_shape = input.sizes().vec();
  plan.out_shape = {g.N, g.O, g.Ho(), g.Wo()};
  plan.rx_shape = {g.N, g.G, g.Ho(), g.Wo()};
  return plan;
}

// What a backward gets besides the forward's arguments: grad_output and
// output of the output's shape, dtype and device; input_rnorm and
// weight_rnorm as the forward returned them.
void check_backward(const CosinePlan& plan, const Tensor& grad_output, const Tensor& output,
                    const Tensor& input_rnorm, const Tensor& weight_rnorm) {
  const char* op = plan.op;
  const auto& x = plan.x;
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_output", &grad_output},
                                {"output", &output}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(plan.out_shape) && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device(),
                op, ": expected ", name, " of the output's shape ", at::IntArrayRef(plan.out_shape), ", dtype ",
                x.scalar_type(), " and device ", x.device(), ", got ", t->sizes(), " ", t->scalar_type(), " on ",
                t->device());
  }
  const auto acc = accumulate_type(x.scalar_type());
  for (const auto& [name, t, shape] :
       {std::tuple<const char*, const Tensor*, at::IntArrayRef>{"input_rnorm", &input_rnorm, plan.rx_shape},
        {"weight_rnorm", &weight_rnorm, at::IntArrayRef(&plan.geo.O, 1)}}) {
    TORCH_CHECK(t->sizes() == shape && t->scalar_type() == acc && t->device() == x.device(), op, ": expected ",
                name, " as the forward returned it: ", shape, " ", acc, " on ", x.device(), ", got ", t->sizes(),
                " ", t->scalar_type(), " on ", t->device());
  }
}

CosineResult forward(const CosinePlan& plan, double eps, const CosineKernels& kernels) {
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), plan.op,
              ": expected a finite eps > 0 (it keeps an all-zero patch's norm from 0), got ", eps);
  const auto& g = plan.geo;
  const auto acc = plan.x.options().dtype(accumulate_type(plan.x.scalar_type()));
  // The dot product, bias included: ATen's convolution, or our CPU float32
  // product (common/cpu_products.h); then the norms and the division.
  Tensor dot = plan.conv ? at::convolution(plan.x, plan.weight, plan.bias, plan.stride, plan.padding, plan.dilation,
                                           /*transposed=*/false, /*output_padding=*/{0, 0}, g.G)
                         : linear_product(plan.x.view({g.N, g.C}), plan.weight, plan.bias);
  dot = dot.contiguous().view({g.N, g.O, g.Ho(), g.Wo()});
  Tensor rx = at::empty({g.N, g.G, g.Ho(), g.Wo()}, acc), rw = at::empty({g.O}, acc);
  // The bias is the weight of a constant input 1 in every patch.
  kernels.weight_rnorm(plan.weight.view({g.O, g.K()}), plan.bias, eps, rw);
  kernels.normalize(plan.x, rw, g, plan.bias ? 1.0 : 0.0, eps, rx, dot);
  return {dot.view(plan.out_shape), rx.view(plan.rx_shape), rw};
}

// The gradients; eps only entered the forward's norms, which the backward is given.
CosineResult backward(const CosinePlan& plan, const Tensor& grad_output, const Tensor& output,
                      const Tensor& input_rnorm, const Tensor& weight_rnorm, std::array<bool, 3> output_mask,
                      const CosineKernels& kernels) {
  check_backward(plan, grad_output, output, input_rnorm, weight_rnorm);
  const auto& g = plan.geo;
  const auto acc = plan.x.options().dtype(accumulate_type(plan.x.scalar_type()));
  const std::vector<int64_t> out4 = {g.N, g.O, g.Ho(), g.Wo()};
  const Tensor dy = grad_output.contiguous().view(out4), y = output.contiguous().view(out4);
  const Tensor rx = input_rnorm.contiguous().view({g.N, g.G, g.Ho(), g.Wo()}), rw = weight_rnorm.contiguous();
  Tensor gd = at::empty_like(dy), q = at::empty_like(rx), t = at::empty({g.O}, acc), sum_gd = at::empty({g.O}, acc);
  kernels.grad_sums(dy, y, rw, rx, g, gd, q, t, sum_gd);
  // The dot product's gradients with gd: ATen's convolution backward, or
  // for the linear layer gd @ W as a product with W.T's rows (the oneDNN
  // path, common/cpu_products.h) and gd.T @ x by at::mm (a transposed left
  // factor, where oneDNN is no faster).
  Tensor grad_x, grad_w;
  if (plan.conv) {
    std::tie(grad_x, grad_w, std::ignore) = at::convolution_backward(
        gd, plan.x, plan.weight, std::nullopt, plan.stride, plan.padding, plan.dilation, /*transposed=*/false,
        /*output_padding=*/{0, 0}, g.G, {output_mask[0], output_mask[1], false});
  } else {
    const Tensor gd2 = gd.view({g.N, g.O});
    if (output_mask[0]) grad_x = linear_product(gd2, plan.weight.t(), std::nullopt);
    if (output_mask[1]) grad_w = at::mm(gd2.t(), plan.x.view({g.N, g.C}));
  }
  // The norms' terms, in place.
  if (output_mask[0]) {
    grad_x = grad_x.contiguous().view({g.N, g.C, g.H, g.W});
    kernels.input_norm_grad(grad_x, plan.x, q, g);
  }
  if (output_mask[1]) grad_w = grad_w.contiguous();
  Tensor grad_b = output_mask[2] && plan.bias ? at::empty({g.O}, plan.bias->options()) : Tensor();
  if (output_mask[1] || grad_b.defined()) {
    kernels.weight_norm_grad(output_mask[1] ? grad_w.view({g.O, g.K()}) : Tensor(), plan.weight.view({g.O, g.K()}),
                             plan.bias, t, sum_gd, grad_b);
  }
  const auto placeholder = [&] { return empty_placeholder(plan.x, plan.x.scalar_type()); };
  return {output_mask[0] ? grad_x.view(plan.in_shape) : placeholder(),
          output_mask[1] ? grad_w.view(plan.weight.sizes()) : placeholder(),
          grad_b.defined() ? grad_b : placeholder()};
}

}  // namespace

CosineResult cosine_linear(const CosineKernels& kernels, const Tensor& input, const Tensor& weight,
                           const std::optional<Tensor>& bias, double eps) {
  return forward(plan_cosine_linear("torchnorm.cosine_linear", input, weight, bias), eps, kernels);
}

CosineResult cosine_linear_backward(const CosineKernels& kernels, const Tensor& grad_output, const Tensor& input,
                                    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& output,
                                    const Tensor& input_rnorm, const Tensor& weight_rnorm,
                                    std::array<bool, 3> output_mask) {
  return backward(plan_cosine_linear("torchnorm.cosine_linear_backward", input, weight, bias), grad_output, output,
                  input_rnorm, weight_rnorm, output_mask, kernels);
}

CosineResult cosine_conv2d(const CosineKernels& kernels, const Tensor& input, const Tensor& weight,
                           const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, double eps) {
  return forward(
      plan_cosine_conv2d("torchnorm.cosine_conv2d", input, weight, bias, stride, padding, dilation, groups), eps,
      kernels);
}

CosineResult cosine_conv2d_backward(const CosineKernels& kernels, const Tensor& grad_output, const Tensor& input,
                                    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& output,
                                    const Tensor& input_rnorm, const Tensor& weight_rnorm, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    std::array<bool, 3> output_mask) {
  return backward(plan_cosine_conv2d("torchnorm.cosine_conv2d_backward", input, weight, bias, stride, padding,
                                     dilation, groups),
                  grad_output, output, input_rnorm, weight_rnorm, output_mask, kernels);
}

}  // namespace torchnorm

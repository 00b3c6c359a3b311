// Every torchnorm operator schema lives here. Backends register kernels in
// csrc/cpu and csrc/cuda with TORCH_LIBRARY_IMPL; fake kernels and autograd
// are registered from Python (torchnorm/_fake.py, torchnorm/_autograd.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(torchnorm, m) {
  // Training-mode BatchNorm: normalizes with the batch statistics, returns
  // (output, batch mean, batch 1/sqrt(var + eps)) and updates the running
  // statistics in place when given: running = (1 - momentum) * running +
  // momentum * batch, with the unbiased batch variance.
  // output = act(BN(input) + residual); activation is 'none', 'relu',
  // 'leaky_relu' (with negative_slope) or 'silu'.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, str activation, float negative_slope, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor)");
  // Inference-mode BatchNorm from running statistics:
  // output = act((input - running_mean) / sqrt(running_var + eps) * weight + bias + residual).
  m.def(
      "batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps, str activation, float negative_slope, Tensor? residual) -> Tensor");
  // Gradients of either forward. mean and rstd are what batch_norm_train
  // returned (training=True) or running_mean and 1/sqrt(running_var + eps)
  // (training=False). Returns (grad_input, grad_weight, grad_bias,
  // grad_residual); an output whose output_mask entry is false is an empty
  // tensor of shape (0,).
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor mean, Tensor rstd, bool training, str activation, "
      "float negative_slope, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

// torchnorm._C is imported only for its side effect of running the
// registrations above; it exposes no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

"""The one table of comparison tolerances for the torchnorm test suite.

Every numeric comparison in tests/ takes its (atol, rtol) from here, chosen by
the dtype of the computation under test and the kind of quantity compared:

  forward  outputs of a forward (normalized, affine, residual, activation)
  grad     gradients (input, weight, bias, residual)
  stats    saved batch mean / rstd and running statistics

float32 and float64 are compared both to torch.nn.functional.batch_norm (same
dtype) and to the float64 reference; float16 and bfloat16 are compared to the
float64 reference evaluated on the very same (already rounded) half values,
so their tolerances only have to absorb the rounding of the result (about
2**-11 relative for float16, 2**-8 for bfloat16) plus float32 accumulation.
"""
import torch

TOLERANCES = {
    torch.float64: {
        "forward": dict(atol=1e-10, rtol=1e-10),
        "grad": dict(atol=1e-9, rtol=1e-9),
        "stats": dict(atol=1e-10, rtol=1e-10),
    },
    torch.float32: {
        "forward": dict(atol=1e-5, rtol=1e-5),
        "grad": dict(atol=1e-4, rtol=1e-4),
        "stats": dict(atol=1e-5, rtol=1e-5),
    },
    torch.float16: {
        "forward": dict(atol=1e-2, rtol=1e-2),
        "grad": dict(atol=2e-2, rtol=2e-2),
        "stats": dict(atol=2e-3, rtol=2e-3),
    },
    torch.bfloat16: {
        "forward": dict(atol=4e-2, rtol=2e-2),
        "grad": dict(atol=8e-2, rtol=4e-2),
        "stats": dict(atol=1.6e-2, rtol=1.6e-2),
    },
}

# The large-mean float16 variance check (mean 1e4, std ~1): the batch variance
# recovered from the saved rstd, var = 1 / rstd**2 - eps, against the float64
# variance of the same float16 values. A robust (Welford / two-pass) float32
# computation is off by ~1e-6 here; E[x^2] - E[x]^2 in float32 is off by ~10.
LARGE_MEAN_VARIANCE = dict(atol=1e-3, rtol=1e-3)

# bfloat16 BN-LSTM gradients (tests/test_sequence_ops.py) against the float64
# reference run on the same rounded inputs, compared norm-wise:
# |got - expected| <= atol_scale * max|expected| + rtol * |expected|.
# Every step stores W_hh h, c and h in bfloat16 (relative 2**-9) and feeds
# them to the next step; the training BatchNorms' backward divides by the
# batch's std (a batch of 16 here) and the recurrence carries the error over
# the T=5 steps, so a gradient, a sum over T*N such terms, is off by a fraction
# of its largest entry, not of each entry: on these cases the fused kernels
# are off by up to 3.4% of the largest entry, and torch's own bfloat16
# composition of the same model (F.batch_norm per step, autograd) by up to
# 4.2%. Outputs and running statistics keep the table's bfloat16 entries.
BN_LSTM_BF16_GRAD = dict(atol_scale=6e-2, rtol=4e-2)

# torch.autograd.gradcheck in float64 (finite differences with eps=1e-6).
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-3)


def tol(dtype, kind="forward"):
    """(atol, rtol) as a dict for assert_close, by dtype and kind."""
    return TOLERANCES[dtype][kind]

# SyncBatchNorm in float64 (tests/test_sync_batch_norm.py) against BatchNorm
# of the concatenated global batch: only the summation order differs (per-rank
# partials merged with Chan's formula), so the 1e-12 holds.
SYNC_BATCH_NORM_F64 = dict(atol=1e-12, rtol=1e-12)

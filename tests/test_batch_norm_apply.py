"""The batch_norm_apply op, with which the Conv + BN blocks rebuild their
outputs in backward: with batch_norm_train's mean / rstd it gives
batch_norm_train's output bit for bit (every dtype, activation, rank and
layout); with any given statistics it is act((x - mean) * rstd * w + b + res);
argument errors; its schema. (opcheck: tests/test_opcheck.py.) These tests run
at the default thread count, so the kernels' parallel paths run.
"""

import pytest
import torch

import torchnorm  # noqa: F401  (registers the ops)
from conftest import (
    ACTIVATIONS,
    DEVICES,
    DTYPES_ALL,
    NEGATIVE_SLOPE,
    act_name,
    assert_close,
    make_input,
    make_params,
    randn,
    torch_act,
)

OPS = torch.ops.torchnorm
EPS = 1e-5


# ---------------------------------------------------------------------------
# batch_norm_apply
# ---------------------------------------------------------------------------

# (shape, layout): every rank, NCHW and channels-last, odd sizes, and shapes
# large enough for the vectorized and parallel paths of both layouts.
APPLY_CASES = [
    pytest.param((6, 5), "contiguous", id="2d"),
    pytest.param((4, 3, 7), "contiguous", id="3d"),
    pytest.param((3, 5, 7, 9), "contiguous", id="4d"),
    pytest.param((3, 5, 7, 9), "channels_last", id="4d-cl"),
    pytest.param((2, 3, 3, 5, 4), "contiguous", id="5d"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
    pytest.param((2, 19, 33, 35), "contiguous", id="4d-large"),
    pytest.param((2, 19, 33, 35), "channels_last", id="4d-large-cl"),
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("shape,layout", APPLY_CASES)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_rebuilds_train_output_bitwise(device, dtypes, shape, layout, with_residual):
    dtype, pdtype = dtypes
    x = make_input(shape, dtype, device, layout, seed=1)
    res = make_input(shape, dtype, device, layout, seed=2, scale=1.0, offset=False) if with_residual else None
    for affine in (True, False):
        w, b, rm, rv = make_params(shape[1], pdtype, device, seed=3, affine=affine)
        for activation in ACTIVATIONS:
            name = act_name(activation)
            out, mean, rstd = OPS.batch_norm_train.default(
                x, w, b, rm, rv, 0.1, EPS, name, NEGATIVE_SLOPE, res)
            rebuilt = OPS.batch_norm_apply.default(x, mean, rstd, w, b, name, NEGATIVE_SLOPE, res)
            where = f"{name}, affine={affine}"
            assert rebuilt.dtype == out.dtype, where
            assert rebuilt.stride() == out.stride(), where
            if not torch.equal(rebuilt, out):
                diff = (rebuilt.double() - out.double()).abs()
                raise AssertionError(f"{where}: rebuilt output differs from batch_norm_train's in "
                                     f"{int((diff > 0).sum())} of {diff.numel()} elements (max {diff.max()})")


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_with_given_statistics(device, dtypes, activation, with_residual):
    """Any mean / rstd (not only batch statistics): act((x - mean) * rstd * w + b + res)."""
    dtype, pdtype = dtypes
    shape = (3, 5, 4, 6)
    x = make_input(shape, dtype, device, "channels_last", seed=4)
    res = make_input(shape, dtype, device, seed=5, scale=1.0, offset=False) if with_residual else None
    w, b, _, _ = make_params(5, pdtype, device, seed=6)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean = randn((5,), 7, stat_dtype, device, scale=1.0)
    rstd = randn((5,), 8, stat_dtype, device, scale=0.2, offset=1.0)
    out = OPS.batch_norm_apply.default(x, mean, rstd, w, b, act_name(activation), NEGATIVE_SLOPE, res)
    view = (1, 5, 1, 1)
    expected = (x.double() - mean.double().view(view)) * rstd.double().view(view) * w.double().view(view) \
        + b.double().view(view)
    if res is not None:
        expected = expected + res.double()
    expected = torch_act(expected, activation)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "forward", f"batch_norm_apply {act_name(activation)}")


@pytest.mark.parametrize("which", ["mean", "rstd"])
def test_apply_rejects_wrong_size_statistics(which):
    x = make_input((2, 5, 3, 4), torch.float32)
    stats = {"mean": torch.zeros(5), "rstd": torch.ones(5)}
    stats[which] = stats[which][:4]
    # the message must name the argument as the schema does (not, say, running_var)
    with pytest.raises(RuntimeError, match=rf"(?<![\w]){which}(?![\w])"):
        OPS.batch_norm_apply.default(x, stats["mean"], stats["rstd"], None, None, "none", 0.0, None)


def test_apply_is_registered():
    schema = str(OPS.batch_norm_apply.default._schema)
    assert "Tensor mean" in schema and "Tensor rstd" in schema and "(a!)" not in schema, schema

"""The autograd wrappers (csrc/autograd/) call an op directly when autograd
has nothing to record: no input requires grad under grad mode, and no input
carries a forward-mode tangent. That path must give the very outputs of the
recorded path, build no graph, and still update the running statistics and
bump their versions; a forward-mode tangent must still reach the custom
Function (which refuses it) rather than be dropped."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torchnorm  # noqa: F401  (registers the ops)

OPS = torch.ops.torchnorm


def _cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape, positive=False):
        v = torch.randn(*shape, generator=g)
        return v.abs() + 0.5 if positive else v

    img, c_w, c_b = t(4, 6, 5, 5), t(6, positive=True), t(6)
    rows, r_w, r_b, r_res = t(6, 10), t(10, positive=True), t(10), t(6, 10)
    return {
        # name: (call(inputs, stats), differentiable inputs, running statistics or None)
        "batch_norm_train": (
            lambda i, s: OPS.batch_norm_train(i[0], i[1], i[2], s[0], s[1], 0.1, 1e-5, "relu", 0.0, i[3]),
            [img, c_w, c_b, t(4, 6, 5, 5)], [torch.zeros(6), torch.ones(6)]),
        "batch_norm_eval": (
            lambda i, s: OPS.batch_norm_eval(i[0], s[0], s[1], i[1], i[2], 1e-5, "silu", 0.0, None),
            [img, c_w, c_b], [t(6), t(6, positive=True)]),
        "layer_norm": (lambda i, s: OPS.layer_norm(i[0], [10], i[1], i[2], 1e-5, i[3]), [rows, r_w, r_b, r_res], None),
        "rms_norm": (lambda i, s: OPS.rms_norm(i[0], [10], i[1], None, i[2]), [rows, r_w, r_res], None),
        "group_norm": (lambda i, s: OPS.group_norm(i[0], 3, i[1], i[2], 1e-5, "silu", 0.0), [img, c_w, c_b], None),
        "instance_norm": (
            lambda i, s: OPS.instance_norm(i[0], i[1], i[2], s[0], s[1], 0.1, 1e-5),
            [img, c_w, c_b], [torch.zeros(6), torch.ones(6)]),
    }


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("how", ["no_grad", "plain_inputs"])
def test_direct_call_matches_recorded(name, how):
    call, inputs, stats = _cases()[name]
    recorded_inputs = [v.clone().requires_grad_() for v in inputs]
    recorded_stats = [s.clone() for s in stats] if stats else None
    recorded = _as_list(call(recorded_inputs, recorded_stats))
    assert recorded[0].grad_fn is not None  # the recorded path, for comparison

    direct_stats = [s.clone() for s in stats] if stats else None
    versions = [s._version for s in direct_stats] if stats else None
    if how == "no_grad":
        with torch.no_grad():
            direct = _as_list(call([v.clone().requires_grad_() for v in inputs], direct_stats))
    else:
        direct = _as_list(call([v.clone() for v in inputs], direct_stats))

    assert len(direct) == len(recorded)
    for d, r in zip(direct, recorded):
        assert d.grad_fn is None and not d.requires_grad
        assert torch.equal(d, r.detach())
    if stats:
        for d, r, v in zip(direct_stats, recorded_stats, versions):
            assert torch.equal(d, r)  # updated as the recorded path updates them
            if name != "batch_norm_eval":
                assert d._version > v  # written in place: the version moves


@pytest.mark.parametrize("name", list(_cases()))
def test_forward_mode_tangent_is_not_dropped(name):
    call, inputs, stats = _cases()[name]
    with fwAD.dual_level():
        dual = [fwAD.make_dual(inputs[0], torch.ones_like(inputs[0]))] + list(inputs[1:])
        with pytest.raises(RuntimeError, match="jvp"):
            call(dual, [s.clone() for s in stats] if stats else None)

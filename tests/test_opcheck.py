"""torch.library.opcheck over every sample of tests/op_samples.py (schema,
fake kernel, autograd registration, faithful aot_autograd), and the check
that every operator the library registers has samples there: a new op (a
backward or internal one included) without samples fails
test_every_registered_op_has_samples.
"""
import pytest
import torch

import torchnorm  # noqa: F401  (registers the ops)
from op_samples import SOURCES, op_overload

NAMESPACE = "torchnorm::"


def registered_ops():
    """The name of every operator registered in the torchnorm namespace (with
    ".overload" where it has one), from the dispatcher's list of schemas."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith(NAMESPACE):
            name = schema.name[len(NAMESPACE):]
            names.add(f"{name}.{schema.overload_name}" if schema.overload_name else name)
    return sorted(names)


def _sample_keys():
    """(source, op name, sample id) of every sample, from a CPU build."""
    return [(source, op_name, sample_id) for source in SOURCES for op_name, sample_id, _ in source.samples("cpu")]


SAMPLE_KEYS = _sample_keys()


def _cases():
    for source, op_name, sample_id in SAMPLE_KEYS:
        for device in source.devices:
            (device_name,) = device.values
            yield pytest.param(source, op_name, sample_id, device_name, marks=device.marks,
                               id=f"{device.id}-{op_name}-{sample_id}")


@pytest.mark.parametrize("source,op_name,sample_id,device", list(_cases()))
def test_opcheck(source, op_name, sample_id, device):
    # built again for this test: opcheck runs the op several times, and some
    # ops update running statistics in place
    args = {(op, sid): args for op, sid, args in source.samples(device)}[(op_name, sample_id)]
    torch.library.opcheck(op_overload(op_name), args)


def test_every_registered_op_has_samples():
    sampled = {op_name.split("::", 1)[-1] for _, op_name, _ in SAMPLE_KEYS}
    missing = [op for op in registered_ops() if op not in sampled and op.split(".")[0] not in sampled]
    assert not missing, f"registered ops without opcheck samples in tests/op_samples.py: {missing}"


def test_registered_ops_are_listed():
    """The schema list sees the library's ops, backward ones included (so an
    empty or partial list cannot make the coverage test pass)."""
    ops = registered_ops()
    for op in ("batch_norm_train", "batch_norm_backward", "batch_norm_apply", "layer_norm_backward",
               "group_norm_backward", "instance_norm", "conv_bn_frozen_backward", "conv_bn_train_backward",
               "masked_batch_norm_backward", "bn_lstm_layer_backward", "_bn_lstm_step_backward"):
        assert op in ops, f"{op} missing from {ops}"


def test_samples_name_registered_ops_with_unique_ids():
    registered = set(registered_ops())
    keys = [(op_name, sample_id) for _, op_name, sample_id in SAMPLE_KEYS]
    assert len(keys) == len(set(keys)), "duplicate (op, sample id)"
    stale = sorted({op for op, _ in keys if op.split("::", 1)[-1] not in registered})
    assert not stale, f"samples for ops that are not registered: {stale}"

"""The sequence-norm modules of torchnorm.nn: RecurrentBatchNorm1d, BNLSTMCell,
BNLSTM, SequenceBatchNorm1d and BNRNN.

- names, shapes and initial values of parameters and buffers (as the issue
  lists them), state_dict round trips;
- BNLSTM (float64) against torchnorm.reference.bn_lstm per layer: outputs,
  h_n / c_n, gradients of input, states and every parameter, running
  statistics after several training calls; batch_first; two layers equal two
  chained single-layer calls; a PackedSequence (sorted or not) equals padded
  input with lengths; in eval with unit statistics it is torch.nn.LSTM
  (padded and packed); a length-0 sequence takes no part; BNLSTMCell at
  step t equals the layer's step t;
- RecurrentBatchNorm1d against torchnorm.reference.recurrent_batch_norm_step;
- SequenceBatchNorm1d against torch.nn.BatchNorm1d on the (T*N, C) reshape
  (running statistics and num_batches_tracked included; state_dict both
  ways) and, with padding, against torchnorm.reference.sequence_batch_norm;
- BNRNN (lstm, gru, tanh) against an independent float64 composition:
  F.batch_norm over the (T*N, G) rows of x @ W_ih^T, then torch.nn.LSTM /
  GRU / RNN with an identity input weight; with lengths, against that
  composition packed;
- bad input: a clear error, buffers untouched;
- torch.compile(fullgraph=True) of models using BNLSTM, SequenceBatchNorm1d
  and BNRNN against eager.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import torchnorm.nn as tnn
import torchnorm.reference as tnref
from conftest import StatsUnchanged, assert_close, assert_same_state, expect_error
from test_sequence_references import rnd

D = torch.float64
LAYER_PARAMS = ("weight_ih", "weight_hh", "bias", "bn_ih_weight", "bn_hh_weight", "bn_c_weight", "bn_c_bias")
KEYS = ("ih", "hh", "c")


def randomize_(module, seed):
    """Random nonzero parameters (BN scales around 0.5) and running statistics
    (positive variances)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bn" in name and "weight" in name:
                v = rnd(gen, *p.shape, scale=0.3, shift=0.5)
            else:
                v = rnd(gen, *p.shape, scale=0.5)
            p.copy_(v)
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.copy_(rnd(gen, *b.shape).abs() + 0.5)
            elif "running_mean" in name:
                b.copy_(rnd(gen, *b.shape, scale=0.5))
    return module


def snapshot(module):
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def buffers_of(module):
    return [b for _, b in module.named_buffers()]


def assert_buffers_close(module, expected, dtype, msg):
    """module's buffers against {name: tensor} (integers exactly)."""
    for n, b in module.named_buffers():
        if b.is_floating_point():
            assert_close(b, expected[n], dtype, "stats", f"{msg}: {n}")
        else:
            assert torch.equal(b, expected[n]), f"{msg}: {n} {b} != {expected[n]}"


def assert_param_grads_close(module, expected, dtype, msg):
    """module's parameter gradients against {name: gradient}."""
    for n, p in module.named_parameters():
        assert p.grad is not None, f"{msg}: {n} has no gradient"
        assert_close(p.grad, expected[n], dtype, "grad", f"{msg}: {n}.grad")


def matrix(axes, fast):
    """pytest.params of every combination of the axes (each a list of (id,
    value)); the combinations whose ids are not in `fast` are marked slow,
    so `pytest -m "not slow"` runs a subset that still covers every value."""
    import itertools

    rows = []
    for combo in itertools.product(*axes):
        ident = "-".join(i for i, _ in combo)
        marks = () if ident in fast else (pytest.mark.slow,)
        rows.append(pytest.param(*[v for _, v in combo], id=ident, marks=marks))
    return rows


def padding_of(lengths, T, N):
    return torch.arange(T).unsqueeze(1) >= torch.as_tensor(lengths).unsqueeze(0)


# ---------------------------------------------------------------------------
# Names, shapes, initial values, state_dict
# ---------------------------------------------------------------------------


# The issue's signatures: (constructor arguments with their defaults, forward
# arguments), in order. Further arguments may follow them.
ISSUE_SIGNATURES = {
    "RecurrentBatchNorm1d": ([("num_features", None), ("max_length", None), ("eps", 1e-5), ("momentum", 0.1),
                              ("affine", True)], ["x", "t"]),
    "BNLSTMCell": ([("input_size", None), ("hidden_size", None), ("max_length", None), ("bias", True)],
                   ["x", "t", "hx"]),
    "BNLSTM": ([("input_size", None), ("hidden_size", None), ("max_length", None), ("num_layers", 1), ("bias", True),
                ("batch_first", False), ("dropout", 0.0)], ["input", "hx", "lengths"]),
    "SequenceBatchNorm1d": ([("num_features", None), ("eps", 1e-5), ("momentum", 0.1), ("affine", True),
                             ("batch_first", False)], ["x", "lengths"]),
    "BNRNN": ([("input_size", None), ("hidden_size", None), ("mode", "lstm"), ("num_layers", 1), ("bias", True),
               ("batch_first", False)], ["input", "hx", "lengths"]),
}


@pytest.mark.parametrize("name", list(ISSUE_SIGNATURES))
def test_signatures_as_the_issue_lists_them(name):
    """Constructor and forward arguments in the issue's order with its
    defaults, so that positional calls written from the issue mean what they
    say."""
    import inspect

    cls = getattr(tnn, name)
    init, forward = ISSUE_SIGNATURES[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params[: len(init)]]
    assert got == init, f"{name}.__init__ starts {got}, the issue: {init}"
    fparams = list(inspect.signature(cls.forward).parameters)[1:]
    assert fparams[: len(forward)] == forward, f"{name}.forward{fparams}, the issue: {forward}"
    for p in params[len(init):]:
        assert p.default is not inspect.Parameter.empty, f"{name}: extra argument {p.name} without a default"


def test_bnlstm_parameter_and_buffer_names():
    """The issue's names, torch.nn.LSTM's where they mean the same, with the
    issue's shapes; no bias without bias=True."""
    I, H, L = 3, 4, 5
    m = tnn.BNLSTM(I, H, max_length=L, num_layers=2)
    params = {n: tuple(p.shape) for n, p in m.named_parameters()}
    expected = {}
    for k in range(2):
        expected.update({
            f"weight_ih_l{k}": (4 * H, I if k == 0 else H), f"weight_hh_l{k}": (4 * H, H), f"bias_l{k}": (4 * H,),
            f"bn_ih_weight_l{k}": (4 * H,), f"bn_hh_weight_l{k}": (4 * H,), f"bn_c_weight_l{k}": (H,),
            f"bn_c_bias_l{k}": (H,),
        })
    assert params == expected
    buffers = {n: tuple(b.shape) for n, b in m.named_buffers()}
    assert buffers == {f"bn_{bn}_running_{stat}_l{k}": (L, H if bn == "c" else 4 * H)
                       for k in range(2) for bn in KEYS for stat in ("mean", "var")}
    assert set(m.state_dict()) == set(params) | set(buffers)
    no_bias = tnn.BNLSTM(I, H, max_length=L, bias=False)
    assert "bias_l0" not in dict(no_bias.named_parameters())
    assert no_bias.bias_l0 is None


def test_bnlstm_initial_values():
    """BN scales 0.1 (the paper's), BN shift 0, running mean 0 / var 1; the
    weights as torch.nn.LSTM's (uniform in +-1/sqrt(H))."""
    H = 16
    for m in (tnn.BNLSTM(3, H, max_length=4, num_layers=2), tnn.BNLSTMCell(3, H, max_length=4)):
        for n, p in m.named_parameters():
            if n.startswith(("bn_ih_weight", "bn_hh_weight", "bn_c_weight")):
                assert torch.equal(p, torch.full_like(p, 0.1)), n
            elif n.startswith("bn_c_bias"):
                assert torch.equal(p, torch.zeros_like(p)), n
            elif n.startswith("weight"):
                assert p.abs().max() <= H ** -0.5 and p.std() > 0.25 * H ** -0.5, n
        for n, b in m.named_buffers():
            want = torch.ones_like(b) if "running_var" in n else torch.zeros_like(b)
            assert torch.equal(b, want), n


def test_recurrent_batch_norm1d_buffers_and_init():
    m = tnn.RecurrentBatchNorm1d(5, max_length=7)
    assert dict((n, tuple(b.shape)) for n, b in m.named_buffers()) == {"running_mean": (7, 5), "running_var": (7, 5)}
    assert torch.equal(m.weight, torch.full((5,), 0.1)) and torch.equal(m.bias, torch.zeros(5))
    assert torch.equal(m.running_mean, torch.zeros(7, 5)) and torch.equal(m.running_var, torch.ones(7, 5))
    plain = tnn.RecurrentBatchNorm1d(5, max_length=7, affine=False)
    assert plain.weight is None and plain.bias is None and not list(plain.parameters())


def test_bnlstm_cell_names_match_the_layer():
    """BNLSTMCell's parameters and buffers are BNLSTM's without the _l0
    suffix, with the same shapes."""
    cell = tnn.BNLSTMCell(3, 4, max_length=5)
    layer = tnn.BNLSTM(3, 4, max_length=5)
    cell_state = {n: tuple(t.shape) for n, t in cell.state_dict().items()}
    layer_state = {n[: -len("_l0")]: tuple(t.shape) for n, t in layer.state_dict().items()}
    assert cell_state == layer_state


def test_bnlstm_state_dict_round_trip():
    """A trained module's state_dict loads (strict) into a fresh one, which
    then gives the same outputs and running statistics, in training and eval."""
    m = randomize_(tnn.BNLSTM(3, 4, max_length=3, num_layers=2, dtype=D), 1)
    x = rnd(torch.Generator().manual_seed(2), 5, 4, 3)
    m(x)
    fresh = tnn.BNLSTM(3, 4, max_length=3, num_layers=2, dtype=D)
    fresh.load_state_dict(m.state_dict())
    for training in (True, False):
        m.train(training)
        fresh.train(training)
        a, b = m(x), fresh(x)
        assert_close(a[0], b[0], D, "forward", "output")
        assert_close(a[1][0], b[1][0], D, "forward", "h_n")
        assert_close(a[1][1], b[1][1], D, "forward", "c_n")
        assert_buffers_close(fresh, snapshot(m), D, f"training={training}")


# ---------------------------------------------------------------------------
# BNLSTM against the reference
# ---------------------------------------------------------------------------


def reference_bnlstm(m, x, hx, lengths, training):
    """m's computation as a chain of tnref.bn_lstm calls (one per layer) on
    float64 leaf copies of its parameters and on copies of its running
    statistics: (output, h_n, c_n), {param name: leaf}, {buffer name: stats}.
    Input (T, N, I), states (num_layers, N, H); no dropout."""
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    buffers = snapshot(m)
    h_n, c_n = [], []
    for k in range(m.num_layers):
        st = {b: (buffers[f"bn_{b}_running_mean_l{k}"], buffers[f"bn_{b}_running_var_l{k}"]) for b in KEYS}
        x, (h, c) = tnref.bn_lstm(x, hx[0][k], hx[1][k], *[params.get(f"{n}_l{k}") for n in LAYER_PARAMS], st,
                                  training, m.momentum, m.eps, lengths)
        h_n.append(h)
        c_n.append(c)
    return (x, torch.stack(h_n), torch.stack(c_n)), params, buffers


def lstm_inputs(seed, T, N, I, H, layers, batch_first=False):
    gen = torch.Generator().manual_seed(seed)
    x = rnd(gen, *((N, T, I) if batch_first else (T, N, I)))
    h0, c0 = rnd(gen, layers, N, H, scale=0.5), rnd(gen, layers, N, H, scale=0.5)
    return x, h0, c0


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("training,layers,batch_first,lengths", matrix(
    [[("train", True), ("eval", False)], [("1layer", 1), ("2layers", 2)], [("TNC", False), ("NTC", True)],
     [("full", None), ("lengths", [5, 0, 2, 5, 1])]],
    fast={"train-1layer-TNC-full", "train-1layer-NTC-lengths", "train-2layers-TNC-lengths",
          "train-2layers-NTC-full", "eval-1layer-TNC-lengths", "eval-2layers-NTC-lengths"}))
def test_bnlstm_matches_reference(training, layers, batch_first, lengths):
    """Three calls (T=5 > max_length=3): outputs, h_n, c_n and running
    statistics after each; then the gradients of input, h0, c0 and every
    parameter. Two layers (dropout 0) are two chained single-layer calls."""
    T, N, I, H = 5, 5, 3, 4
    m = randomize_(tnn.BNLSTM(I, H, max_length=3, num_layers=layers, batch_first=batch_first, momentum=0.2,
                              eps=1e-4, dtype=D), 3).train(training)
    lens = None if lengths is None else torch.tensor(lengths)
    for call in range(3):
        x, h0, c0 = leaves(*lstm_inputs(4 + call, T, N, I, H, layers, batch_first))
        expected, ref_params, ref_buffers = reference_bnlstm(m, x.transpose(0, 1) if batch_first else x, (h0, c0),
                                                             lens, training)
        m.zero_grad()
        out, (hn, cn) = m(x, (h0, c0), lengths=lens)
        out_e = expected[0].transpose(0, 1) if batch_first else expected[0]
        assert_close(out, out_e, D, "forward", f"call {call}: output")
        assert_close(hn, expected[1], D, "forward", f"call {call}: h_n")
        assert_close(cn, expected[2], D, "forward", f"call {call}: c_n")
        assert_buffers_close(m, ref_buffers, D, f"call {call}")
    gen = torch.Generator().manual_seed(9)
    gs = [rnd(gen, *t.shape) for t in (out, hn, cn)]
    got = torch.autograd.grad([out, hn, cn], [x, h0, c0], gs, retain_graph=True)
    sum((t * g).sum() for t, g in zip((out, hn, cn), gs)).backward()
    want = torch.autograd.grad([out_e, expected[1], expected[2]], [x, h0, c0, *ref_params.values()], gs)
    for name, g, w in zip(("input", "h0", "c0"), got, want[:3]):
        assert_close(g, w, D, "grad", name)
    assert_param_grads_close(m, dict(zip(ref_params, want[3:])), D, "parameters")


def test_bnlstm_dropout_is_off_in_eval_and_between_layers_only():
    """dropout acts between layers in training only: in eval a module with
    dropout equals one without; with one layer it has nothing to drop."""
    x = rnd(torch.Generator().manual_seed(10), 4, 3, 2)
    a = randomize_(tnn.BNLSTM(2, 3, max_length=4, num_layers=2, dropout=0.5, dtype=D), 11).eval()
    b = tnn.BNLSTM(2, 3, max_length=4, num_layers=2, dtype=D).eval()
    b.load_state_dict(a.state_dict())
    assert_close(a(x)[0], b(x)[0], D, "forward", "eval with dropout")
    c = randomize_(tnn.BNLSTM(2, 3, max_length=4, dropout=0.5, dtype=D), 12).train()
    d = tnn.BNLSTM(2, 3, max_length=4, dtype=D).train()
    d.load_state_dict(c.state_dict())
    assert_close(c(x)[0], d(x)[0], D, "forward", "one layer with dropout")
    torch.manual_seed(0)
    a.train()
    b.train()
    assert not torch.allclose(a(x)[0], b(x)[0]), "dropout between layers had no effect in training"


@pytest.mark.parametrize("batch_first", [False, True], ids=["TNC", "NTC"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_bnlstm_packed_equals_padded_with_lengths(enforce_sorted, batch_first):
    """A PackedSequence (built with enforce_sorted=False from unsorted lengths
    too) gives the padded-with-lengths result repacked in the input's order
    (same batch_sizes and sorted / unsorted indices), h_n and c_n in the
    original batch order, the same running statistics and gradients."""
    T, N, I, H = 5, 4, 3, 4
    lens = torch.tensor([5, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4])
    padded = randomize_(tnn.BNLSTM(I, H, max_length=3, num_layers=2, batch_first=batch_first, dtype=D), 13)
    packed_m = copy.deepcopy(padded)
    x, h0, c0 = lstm_inputs(14, T, N, I, H, 2, batch_first)
    xa, xb = leaves(x, x)
    packed = pack_padded_sequence(xb, lens, batch_first=batch_first, enforce_sorted=enforce_sorted)
    out_p, (hn_p, cn_p) = packed_m(packed, (h0, c0))
    out_l, (hn_l, cn_l) = padded(xa, (h0, c0), lengths=lens)
    assert isinstance(out_p, PackedSequence)
    repacked = pack_padded_sequence(out_l, lens, batch_first=batch_first, enforce_sorted=enforce_sorted)
    assert torch.equal(out_p.batch_sizes, packed.batch_sizes)
    for got, want in ((out_p.sorted_indices, packed.sorted_indices), (out_p.unsorted_indices, packed.unsorted_indices)):
        assert (got is None and want is None) or torch.equal(got, want)
    assert_close(out_p.data, repacked.data, D, "forward", "packed output")
    assert_close(hn_p, hn_l, D, "forward", "h_n")
    assert_close(cn_p, cn_l, D, "forward", "c_n")
    assert_buffers_close(packed_m, snapshot(padded), D, "packed vs padded")
    gen = torch.Generator().manual_seed(15)
    g_out, g_h, g_c = rnd(gen, *out_l.shape), rnd(gen, *hn_l.shape), rnd(gen, *cn_l.shape)
    g_packed = pack_padded_sequence(g_out, lens, batch_first=batch_first, enforce_sorted=enforce_sorted).data
    torch.autograd.backward([out_p.data, hn_p, cn_p], [g_packed, g_h, g_c])
    torch.autograd.backward([out_l, hn_l, cn_l], [g_out, g_h, g_c])
    pad = padding_of(lens, T, N)
    assert_close(xb.grad, xa.grad, D, "grad", "input")
    assert (xb.grad[pad.t() if batch_first else pad] == 0).all()
    assert_param_grads_close(packed_m, {n: p.grad for n, p in padded.named_parameters()}, D, "packed vs padded")


@pytest.mark.parametrize("form", ["padded", "packed-unsorted", "packed-batch-first"])
def test_bnlstm_in_eval_with_unit_statistics_is_torch_lstm(form):
    """In eval, with every running mean 0, running variance 1 - eps and BN
    scales 1 (BN_c shift 0), every BN is the identity and BNLSTM is
    torch.nn.LSTM (bias_ih = bias, bias_hh = 0): an independent check of
    torch.nn.LSTM's conventions, for padded input and for a PackedSequence
    built with enforce_sorted=False (h0 / c0 and h_n / c_n in the original
    batch order, the output packed as the input): outputs, states and the
    gradients of input, states and weights."""
    T, N, I, H, layers, eps = 5, 4, 3, 4, 2, 1e-5
    batch_first = form == "packed-batch-first"
    m = randomize_(tnn.BNLSTM(I, H, max_length=3, num_layers=layers, batch_first=batch_first, eps=eps, dtype=D),
                   60).eval()
    lstm = torch.nn.LSTM(I, H, num_layers=layers, batch_first=batch_first, dtype=D)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith(("bn_ih_weight", "bn_hh_weight", "bn_c_weight")):
                p.fill_(1.0)
            elif n.startswith("bn_c_bias"):
                p.zero_()
        for n, b in m.named_buffers():
            b.fill_(1.0 - eps) if "running_var" in n else b.zero_()
        for k in range(layers):
            for name in ("weight_ih", "weight_hh"):
                getattr(lstm, f"{name}_l{k}").copy_(getattr(m, f"{name}_l{k}"))
            getattr(lstm, f"bias_ih_l{k}").copy_(getattr(m, f"bias_l{k}"))
            getattr(lstm, f"bias_hh_l{k}").zero_()
    x, h0, c0 = lstm_inputs(61, T, N, I, H, layers, batch_first)
    xa, h0a, c0a, xb, h0b, c0b = leaves(x, h0, c0, x, h0, c0)
    lens = torch.tensor([3, 5, 1, 4])
    if form == "padded":
        a, b = m(xa, (h0a, c0a)), lstm(xb, (h0b, c0b))
        outs = a[0], b[0]
    else:
        a = m(pack_padded_sequence(xa, lens, batch_first=batch_first, enforce_sorted=False), (h0a, c0a))
        b = lstm(pack_padded_sequence(xb, lens, batch_first=batch_first, enforce_sorted=False), (h0b, c0b))
        assert torch.equal(a[0].sorted_indices, b[0].sorted_indices)
        assert torch.equal(a[0].batch_sizes, b[0].batch_sizes)
        outs = a[0].data, b[0].data
    assert_close(outs[0], outs[1], D, "forward", "output")
    assert_close(a[1][0], b[1][0], D, "forward", "h_n")
    assert_close(a[1][1], b[1][1], D, "forward", "c_n")
    gen = torch.Generator().manual_seed(62)
    gs = [rnd(gen, *t.shape) for t in (outs[1], *b[1])]
    torch.autograd.backward([outs[0], *a[1]], gs)
    torch.autograd.backward([outs[1], *b[1]], gs)
    for name, u, v in (("input", xa, xb), ("h0", h0a, h0b), ("c0", c0a, c0b)):
        assert_close(u.grad, v.grad, D, "grad", name)
    for k in range(layers):
        for ours_name, torch_name in (("weight_ih", "weight_ih"), ("weight_hh", "weight_hh"), ("bias", "bias_ih")):
            assert_close(getattr(m, f"{ours_name}_l{k}").grad, getattr(lstm, f"{torch_name}_l{k}").grad, D, "grad",
                         f"{ours_name}_l{k}")


def test_bnlstm_length_zero_sequence_takes_no_part():
    """A length-0 sequence changes nothing for the others (it is in no step's
    statistics): the batch without it gives the same results; its own output
    is 0 and its h_n / c_n are h0 / c0."""
    T, N, I, H = 4, 4, 3, 4
    lens = torch.tensor([3, 0, 4, 2])
    keep = torch.tensor([0, 2, 3])
    m = randomize_(tnn.BNLSTM(I, H, max_length=3, num_layers=2, dtype=D), 16)
    other = copy.deepcopy(m)
    x, h0, c0 = lstm_inputs(17, T, N, I, H, 2)
    out, (hn, cn) = m(x, (h0, c0), lengths=lens)
    out_k, (hn_k, cn_k) = other(x[:, keep], (h0[:, keep], c0[:, keep]), lengths=lens[keep])
    assert_close(out[:, keep], out_k, D, "forward", "output")
    assert_close(hn[:, keep], hn_k, D, "forward", "h_n")
    assert_close(cn[:, keep], cn_k, D, "forward", "c_n")
    assert_buffers_close(m, snapshot(other), D, "without the empty sequence")
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.equal(hn[:, 1], h0[:, 1]) and torch.equal(cn[:, 1], c0[:, 1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bnlstm_cell_at_step_t_equals_the_layer(training):
    """BNLSTMCell with the layer's parameters, called at t = 0..T-1 (T >
    max_length) with its own previous state, gives the layer's step t:
    outputs, final state, running statistics and gradients."""
    T, N, I, H, L = 5, 4, 3, 4, 3
    layer = randomize_(tnn.BNLSTM(I, H, max_length=L, dtype=D), 18).train(training)
    cell = tnn.BNLSTMCell(I, H, max_length=L, dtype=D).train(training)
    cell.load_state_dict({n[: -len("_l0")]: t for n, t in layer.state_dict().items()})
    x, h0, c0 = lstm_inputs(19, T, N, I, H, 1)
    xa, xb = leaves(x, x)
    out, (hn, cn) = layer(xa, (h0, c0))
    h, c = h0[0], c0[0]
    steps = []
    for t in range(T):
        h, c = cell(xb[t], t, (h, c))
        steps.append(h)
        assert_close(h, out[t], D, "forward", f"step {t}")
    assert_close(c, cn[0], D, "forward", "c_n")
    for n, b in cell.named_buffers():
        assert_close(b, layer.get_buffer(n + "_l0"), D, "stats", n)
    gen = torch.Generator().manual_seed(20)
    g_out, g_c = rnd(gen, T, N, H), rnd(gen, N, H)
    torch.autograd.backward([out, cn[0]], [g_out, g_c])
    torch.autograd.backward([torch.stack(steps), c], [g_out, g_c])
    assert_close(xb.grad, xa.grad, D, "grad", "input")
    for n, p in cell.named_parameters():
        assert_close(p.grad, layer.get_parameter(n + "_l0").grad, D, "grad", n)


def test_bnlstm_cell_default_state_is_zero():
    cell = randomize_(tnn.BNLSTMCell(3, 4, max_length=2, dtype=D), 21)
    x = rnd(torch.Generator().manual_seed(22), 5, 3)
    a = cell(x, 1)
    b = copy.deepcopy(cell)(x, 1, (torch.zeros(5, 4, dtype=D), torch.zeros(5, 4, dtype=D)))
    assert_close(a[0], b[0], D, "forward", "h")
    assert_close(a[1], b[1], D, "forward", "c")


# ---------------------------------------------------------------------------
# RecurrentBatchNorm1d
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_recurrent_batch_norm1d_matches_reference(training, affine):
    """Steps 0..5 with max_length 3, a mask at some steps: outputs, running
    statistics (rows per step, the last one shared) and gradients."""
    N, C, L = 6, 4, 3
    m = randomize_(tnn.RecurrentBatchNorm1d(C, L, eps=1e-3, momentum=0.3, affine=affine, dtype=D), 23).train(training)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    gen = torch.Generator().manual_seed(24)
    for t in range(6):
        mask = torch.tensor([True, False, True, True, False, True]) if t % 2 else None
        x = rnd(gen, N, C, scale=2.0, shift=1.0)
        xa, xr = leaves(x, x)
        w, b = (leaves(m.weight, m.bias) if affine else (None, None))
        y = m(xa, t, mask)
        y_ref = tnref.recurrent_batch_norm_step(xr, t, rm, rv, w, b, training, 0.3, 1e-3, mask)
        assert_close(y, y_ref, D, "forward", f"step {t}")
        assert_close(m.running_mean, rm, D, "stats", f"step {t}: running_mean")
        assert_close(m.running_var, rv, D, "stats", f"step {t}: running_var")
        gy = rnd(gen, N, C)
        m.zero_grad()
        y.backward(gy)
        y_ref.backward(gy)
        assert_close(xa.grad, xr.grad, D, "grad", f"step {t}: input")
        if affine:
            assert_close(m.weight.grad, w.grad, D, "grad", "weight")
            assert_close(m.bias.grad, b.grad, D, "grad", "bias")


# ---------------------------------------------------------------------------
# SequenceBatchNorm1d
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,config,batch_first", matrix(
    [[("f64", torch.float64), ("f32", torch.float32)],
     [("default", dict()), ("cumulative", dict(momentum=None)), ("noaffine", dict(affine=False)),
      ("notrack", dict(track_running_stats=False)), ("momentum-eps", dict(momentum=0.3, eps=1e-3))],
     [("TNC", False), ("NTC", True)]],
    fast={"f64-default-TNC", "f64-cumulative-NTC", "f64-notrack-TNC", "f32-noaffine-NTC", "f32-momentum-eps-TNC"}))
def test_sequence_batch_norm1d_equals_batch_norm1d_on_the_reshape(dtype, config, batch_first):
    """Without padding: torch.nn.BatchNorm1d (float64) on the (T*N, C)
    reshape, three training calls then eval: outputs, gradients, running
    statistics and num_batches_tracked; the state_dict keys are
    BatchNorm1d's."""
    T, N, C = 4, 3, 5
    ref = randomize_(torch.nn.BatchNorm1d(C, dtype=D, **config), 25)
    ours = tnn.SequenceBatchNorm1d(C, batch_first=batch_first, dtype=dtype, **config)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(26)
    for call, training in enumerate((True, True, True, False)):
        ref.train(training)
        ours.train(training)
        x = rnd(gen, T, N, C, scale=2.0, shift=1.0).to(dtype)
        xr = x.double().reshape(T * N, C).requires_grad_()
        xo = (x.transpose(0, 1).contiguous() if batch_first else x).requires_grad_()
        ours.zero_grad()
        ref.zero_grad()
        y = ours(xo)
        y_ref = ref(xr).reshape(T, N, C)
        y_t = y.transpose(0, 1) if batch_first else y
        assert_close(y_t, y_ref, dtype, "forward", f"call {call}")
        gy = rnd(gen, T, N, C)
        y_t.backward(gy.to(dtype))
        y_ref.backward(gy)
        g = xo.grad.transpose(0, 1) if batch_first else xo.grad
        assert_close(g, xr.grad.reshape(T, N, C), dtype, "grad", f"call {call}: input")
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert_close(p.grad, q.grad, dtype, "grad", f"call {call}: {n}")
        assert_same_state(ours, ref.to(dtype) if dtype != D else ref, dtype, f"call {call}")
        ref.to(D)


def test_sequence_batch_norm1d_state_dict_loads_both_ways():
    ref = randomize_(torch.nn.BatchNorm1d(5, dtype=D), 27)
    ref.num_batches_tracked.fill_(7)
    ours = tnn.SequenceBatchNorm1d(5, dtype=D)
    ours.load_state_dict(ref.state_dict())
    assert_same_state(ours, ref, D, "BatchNorm1d -> SequenceBatchNorm1d")
    x = rnd(torch.Generator().manual_seed(28), 3, 4, 5)
    ours(x)  # change its state
    back = torch.nn.BatchNorm1d(5, dtype=D)
    back.load_state_dict(ours.state_dict())
    assert_same_state(back, ours, D, "SequenceBatchNorm1d -> BatchNorm1d")
    assert int(back.num_batches_tracked) == 8


@pytest.mark.parametrize("batch_first", [False, True], ids=["TNC", "NTC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequence_batch_norm1d_with_padding_matches_reference(training, batch_first):
    """Unsorted lengths with a 0: the reference's output (padded positions
    exactly 0), gradients and running statistics; num_batches_tracked counts
    the call."""
    T, N, C = 5, 4, 3
    lens = torch.tensor([2, 5, 0, 3])
    m = randomize_(tnn.SequenceBatchNorm1d(C, momentum=0.2, batch_first=batch_first, dtype=D), 29).train(training)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    gen = torch.Generator().manual_seed(30)
    x = rnd(gen, *((N, T, C) if batch_first else (T, N, C)), scale=2.0, shift=1.0)
    xa, xr = leaves(x, x)
    w, b = leaves(m.weight, m.bias)
    y = m(xa, lens)
    y_ref = tnref.sequence_batch_norm(xr, rm, rv, w, b, training, 0.2, 1e-5, lens, batch_first)
    assert_close(y, y_ref, D, "forward", "output")
    pad = padding_of(lens, T, N)
    pad = pad.t() if batch_first else pad
    assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    assert_close(m.running_mean, rm, D, "stats", "running_mean")
    assert_close(m.running_var, rv, D, "stats", "running_var")
    assert int(m.num_batches_tracked) == (1 if training else 0)
    gy = rnd(gen, *x.shape)
    y.backward(gy)
    y_ref.backward(gy)
    assert_close(xa.grad, xr.grad, D, "grad", "input")
    assert_close(m.weight.grad, w.grad, D, "grad", "weight")
    assert_close(m.bias.grad, b.grad, D, "grad", "bias")


# ---------------------------------------------------------------------------
# BNRNN against BatchNorm + torch.nn.LSTM / GRU / RNN
# ---------------------------------------------------------------------------

TORCH_RNN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "tanh": torch.nn.RNN}
GATES = {"lstm": 4, "gru": 3, "tanh": 1}


def bnrnn_composition(m, x, hx, lengths, training):
    """m's computation from torch ops, in float64, on leaf copies of its
    parameters: per layer, F.batch_norm over the (valid) (T*N, G) rows of
    x @ W_ih^T (scale bn_weight, shift bias_ih, running statistics: copies of
    m's), then torch.nn.LSTM / GRU / RNN with weight_ih the G x G identity,
    bias_ih 0 and m's weight_hh / bias_hh, packed (enforce_sorted=False)
    with lengths. Returns (output, state), {m's param name: leaf}, {buffer
    name: statistics}. x (T, N, I)."""
    T, N = x.shape[:2]
    H, mode = m.hidden_size, m.mode
    G = GATES[mode] * H
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    buffers = snapshot(m)
    valid = None if lengths is None else ~padding_of(lengths, T, N)
    h_n, c_n = [], []
    for k in range(m.num_layers):
        gates = x @ params[f"weight_ih_l{k}"].t()
        rows = gates.reshape(T * N, G) if valid is None else gates[valid]
        normed = F.batch_norm(rows, buffers[f"bn_running_mean_l{k}"], buffers[f"bn_running_var_l{k}"],
                              params[f"bn_weight_l{k}"], params.get(f"bias_ih_l{k}"), training, m.momentum, m.eps)
        if valid is None:
            gx = normed.reshape(T, N, G)
        else:
            gx = torch.zeros(T, N, G, dtype=D).index_put((valid.nonzero(as_tuple=True)), normed)
        rnn = TORCH_RNN[mode](G, H, bias=m.bias, dtype=D, **({} if mode != "tanh" else {"nonlinearity": "tanh"}))
        rnn.weight_ih_l0 = torch.nn.Parameter(torch.eye(G, dtype=D), requires_grad=False)
        # torch.nn's own parameters are the leaves whose gradients count
        rnn.weight_hh_l0 = params[f"weight_hh_l{k}"] = torch.nn.Parameter(params[f"weight_hh_l{k}"].detach())
        if m.bias:
            rnn.bias_ih_l0 = torch.nn.Parameter(torch.zeros(G, dtype=D), requires_grad=False)
            rnn.bias_hh_l0 = params[f"bias_hh_l{k}"] = torch.nn.Parameter(params[f"bias_hh_l{k}"].detach())
        state = (hx[0][k:k + 1], hx[1][k:k + 1]) if mode == "lstm" else hx[k:k + 1]
        if lengths is None:
            x, s = rnn(gx, state)
        else:
            out, s = rnn(pack_padded_sequence(gx, lengths, enforce_sorted=False), state)
            x = pad_packed_sequence(out, total_length=T)[0]
        h_n.append(s[0] if mode == "lstm" else s)
        if mode == "lstm":
            c_n.append(s[1])
    state = (torch.cat(h_n), torch.cat(c_n)) if mode == "lstm" else torch.cat(h_n)
    return (x, state), params, buffers


@pytest.mark.parametrize("mode,training,config,lengths", matrix(
    [[("lstm", "lstm"), ("gru", "gru"), ("tanh", "tanh")], [("train", True), ("eval", False)],
     [("1layer", (1, True, False)), ("2layers-batch-first", (2, True, True)), ("nobias", (1, False, False))],
     [("full", None), ("lengths", [5, 2, 4, 1, 5])]],
    fast={"lstm-train-2layers-batch-first-lengths", "gru-train-nobias-lengths", "tanh-train-1layer-full",
          "lstm-eval-1layer-lengths", "gru-eval-2layers-batch-first-full", "tanh-eval-nobias-lengths",
          "tanh-train-2layers-batch-first-lengths"}))
def test_bnrnn_matches_batch_norm_then_torch_rnn(mode, training, config, lengths):
    """Two calls: outputs, final states, running statistics; then gradients of
    input, initial state and every parameter (W_ih, bn_weight, bias_ih as the
    BN's shift, weight_hh, bias_hh)."""
    T, N, I, H = 5, 5, 3, 4
    layers, bias, batch_first = config
    m = randomize_(tnn.BNRNN(I, H, mode=mode, num_layers=layers, bias=bias, batch_first=batch_first, momentum=0.2,
                             dtype=D), 31).train(training)
    lens = None if lengths is None else torch.tensor(lengths)
    gen = torch.Generator().manual_seed(32)
    for call in range(2):
        x0 = rnd(gen, T, N, I, scale=2.0, shift=0.5)
        h0 = rnd(gen, layers, N, H, scale=0.5)
        c0 = rnd(gen, layers, N, H, scale=0.5)
        x, xr = leaves(x0, x0)
        hx = tuple(leaves(h0, c0)) if mode == "lstm" else leaves(h0)[0]
        hxr = tuple(leaves(h0, c0)) if mode == "lstm" else leaves(h0)[0]
        (out_e, state_e), ref_params, ref_buffers = bnrnn_composition(m, xr, hxr, lens, training)
        m.zero_grad()
        out, state = m(x.transpose(0, 1).contiguous() if batch_first else x, hx, lengths=lens)
        out = out.transpose(0, 1) if batch_first else out
        assert_close(out, out_e, D, "forward", f"call {call}: output")
        states = state if mode == "lstm" else (state,)
        states_e = state_e if mode == "lstm" else (state_e,)
        for i, (s, e) in enumerate(zip(states, states_e)):
            assert_close(s, e, D, "forward", f"call {call}: state {i}")
        assert_buffers_close(m, ref_buffers, D, f"call {call}")
    gs = [rnd(gen, *t.shape) for t in (out, *states)]
    torch.autograd.backward([out, *states], gs)
    torch.autograd.backward([out_e, *states_e], gs)
    assert_close(x.grad, xr.grad, D, "grad", "input")
    for s, e in zip(hx if mode == "lstm" else (hx,), hxr if mode == "lstm" else (hxr,)):
        assert_close(s.grad, e.grad, D, "grad", "initial state")
    assert_param_grads_close(m, {n: p.grad for n, p in ref_params.items()}, D, "parameters")


@pytest.mark.parametrize("mode", ["lstm", "gru", "tanh"])
def test_bnrnn_packed_and_length_zero(mode):
    """A PackedSequence (unsorted) equals padded input with lengths; a
    length-0 sequence (which packing cannot hold) changes nothing for the
    others, outputs 0 and keeps its initial state."""
    T, N, I, H = 4, 4, 3, 4
    lens = torch.tensor([3, 1, 4, 2])
    m = randomize_(tnn.BNRNN(I, H, mode=mode, num_layers=2, dtype=D), 33)
    other = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(34)
    x = rnd(gen, T, N, I)
    out_p, state_p = m(pack_padded_sequence(x, lens, enforce_sorted=False))
    out_l, state_l = other(x, lengths=lens)
    assert_close(out_p.data, pack_padded_sequence(out_l, lens, enforce_sorted=False).data, D, "forward", "packed")
    for s, e in zip(state_p if mode == "lstm" else (state_p,), state_l if mode == "lstm" else (state_l,)):
        assert_close(s, e, D, "forward", "state")
    assert_buffers_close(m, snapshot(other), D, "packed vs padded")

    lens0 = torch.tensor([3, 0, 4, 2])
    keep = torch.tensor([0, 2, 3])
    h0 = rnd(gen, 2, N, H)
    hx = (h0, rnd(gen, 2, N, H)) if mode == "lstm" else h0
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    out, state = a(x, hx, lengths=lens0)
    hx_k = tuple(h[:, keep] for h in hx) if mode == "lstm" else hx[:, keep]
    out_k, state_k = b(x[:, keep], hx_k, lengths=lens0[keep])
    assert_close(out[:, keep], out_k, D, "forward", "without the empty sequence")
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    for s, sk, h in zip(state if mode == "lstm" else (state,), state_k if mode == "lstm" else (state_k,),
                        hx if mode == "lstm" else (hx,)):
        assert_close(s[:, keep], sk, D, "forward", "state without the empty sequence")
        assert torch.equal(s[:, 1], h[:, 1]), "the empty sequence keeps its initial state"
    assert_buffers_close(a, snapshot(b), D, "without the empty sequence")


# ---------------------------------------------------------------------------
# Bad input: a clear error, buffers untouched
# ---------------------------------------------------------------------------


def _bnlstm():
    return randomize_(tnn.BNLSTM(3, 4, max_length=3, num_layers=2, dtype=D), 40)


def _bnrnn():
    return randomize_(tnn.BNRNN(3, 4, mode="gru", dtype=D), 41)


X = torch.ones(5, 2, 3, dtype=D)
BAD_MODULE_CALLS = {
    "bnlstm-input-size": (_bnlstm, lambda m: m(torch.ones(5, 2, 4, dtype=D)), "expected input_size 3"),
    "bnlstm-unbatched": (_bnlstm, lambda m: m(torch.ones(5, 3, dtype=D)), "needs batched input"),
    "bnlstm-lengths-longer": (_bnlstm, lambda m: m(X, lengths=torch.tensor([5, 6])), r"lengths must lie in \[0, 5\]"),
    "bnlstm-lengths-shape": (_bnlstm, lambda m: m(X, lengths=torch.tensor([5, 2, 1])), r"lengths must have shape"),
    "bnlstm-lengths-and-packed": (
        _bnlstm, lambda m: m(pack_padded_sequence(X, [5, 2]), lengths=torch.tensor([5, 2])), "not both"),
    "bnlstm-hx-shape": (
        _bnlstm, lambda m: m(X, (torch.zeros(1, 2, 4, dtype=D), torch.zeros(2, 2, 4, dtype=D))),
        r"initial state of shape \(2, 2, 4\)"),
    "bnlstm-batch-first-lengths": (
        lambda: randomize_(tnn.BNLSTM(3, 4, max_length=3, batch_first=True, dtype=D), 42),
        lambda m: m(torch.ones(2, 5, 3, dtype=D), lengths=torch.tensor([5, 6])), r"lengths must lie in \[0, 5\]"),
    "cell-negative-t": (
        lambda: randomize_(tnn.BNLSTMCell(3, 4, max_length=3, dtype=D), 43),
        lambda m: m(torch.ones(2, 3, dtype=D), -1), "t must be >= 0"),
    "cell-unbatched": (
        lambda: randomize_(tnn.BNLSTMCell(3, 4, max_length=3, dtype=D), 43),
        lambda m: m(torch.ones(3, dtype=D), 0), "needs batched"),
    "cell-input-size": (
        lambda: randomize_(tnn.BNLSTMCell(3, 4, max_length=3, dtype=D), 43),
        lambda m: m(torch.ones(2, 5, dtype=D), 0), "input_size 3"),
    "rbn-negative-t": (
        lambda: randomize_(tnn.RecurrentBatchNorm1d(3, 4, dtype=D), 44),
        lambda m: m(torch.ones(2, 3, dtype=D), -2), "t must be >= 0"),
    "rbn-features": (
        lambda: randomize_(tnn.RecurrentBatchNorm1d(3, 4, dtype=D), 44),
        lambda m: m(torch.ones(2, 4, dtype=D), 0), r"expects an \(N, 3\) input"),
    "rbn-unbatched": (
        lambda: randomize_(tnn.RecurrentBatchNorm1d(3, 4, dtype=D), 44),
        lambda m: m(torch.ones(3, dtype=D), 0), r"expects an \(N, 3\) input"),
    "rbn-mask-shape": (
        lambda: randomize_(tnn.RecurrentBatchNorm1d(3, 4, dtype=D), 44),
        lambda m: m(torch.ones(2, 3, dtype=D), 0, torch.ones(3, dtype=torch.bool)), "valid of shape"),
    "sbn-2d": (
        lambda: randomize_(tnn.SequenceBatchNorm1d(3, dtype=D), 45),
        lambda m: m(torch.ones(4, 3, dtype=D)), "3-d"),
    "sbn-features": (
        lambda: randomize_(tnn.SequenceBatchNorm1d(3, dtype=D), 45),
        lambda m: m(torch.ones(4, 2, 5, dtype=D)), "weight of shape"),
    "sbn-lengths-longer": (
        lambda: randomize_(tnn.SequenceBatchNorm1d(3, dtype=D), 45),
        lambda m: m(X, torch.tensor([5, 6])), r"lengths must lie in \[0, 5\]"),
    "bnrnn-input-size": (_bnrnn, lambda m: m(torch.ones(5, 2, 4, dtype=D)), "expected input_size 3"),
    "bnrnn-unbatched": (_bnrnn, lambda m: m(torch.ones(5, 3, dtype=D)), "needs batched input"),
    "bnrnn-lengths-longer": (_bnrnn, lambda m: m(X, lengths=torch.tensor([6, 2])), r"lengths must lie in \[0, 5\]"),
    "bnrnn-hx-shape": (_bnrnn, lambda m: m(X, torch.zeros(1, 3, 4, dtype=D)), r"initial state of shape \(1, 2, 4\)"),
}


@pytest.mark.parametrize("name", list(BAD_MODULE_CALLS))
def test_module_bad_input(name):
    make, call, match = BAD_MODULE_CALLS[name]
    m = make().train()
    before = snapshot(m)
    expect_error(lambda: call(m), match, StatsUnchanged(*buffers_of(m)))
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"{n} changed"


def test_module_constructor_errors():
    for build, match in (
        (lambda: tnn.BNLSTM(3, 4, max_length=0), "max_length"),
        (lambda: tnn.BNLSTM(3, 4, max_length=2, num_layers=0), "num_layers"),
        (lambda: tnn.BNLSTM(3, 4, max_length=2, dropout=1.5), "dropout"),
        (lambda: tnn.BNLSTMCell(3, 4, max_length=0), "max_length"),
        (lambda: tnn.RecurrentBatchNorm1d(3, max_length=0), "max_length"),
        (lambda: tnn.BNRNN(3, 4, mode="relu6"), "mode"),
    ):
        with pytest.raises(ValueError, match=match):
            build()


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


class SequenceNet(torch.nn.Module):
    """BNLSTM (two layers) -> SequenceBatchNorm1d -> BNRNN (gru) -> Linear."""

    def __init__(self, with_rnn=True):
        super().__init__()
        self.lstm = tnn.BNLSTM(3, 4, max_length=3, num_layers=2)
        self.norm = tnn.SequenceBatchNorm1d(4, momentum=0.3)
        self.rnn = tnn.BNRNN(4, 4, mode="gru") if with_rnn else None
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, lengths):
        y, (h, c) = self.lstm(x, lengths=lengths)
        y = self.norm(y, lengths)
        if self.rnn is not None:
            y, h2 = self.rnn(y, lengths=lengths)
            h = h + h2
        return self.head(y), h, c


def _check_compiled(net, backend, dynamic):
    torch._dynamo.reset()
    for m in net.modules():
        if m is not net and not isinstance(m, torch.nn.Linear):
            randomize_(m, 50)
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(51)
    calls = [(5, torch.tensor([5, 2, 4, 1, 5, 3])), (5, torch.tensor([3, 5, 5, 2, 1, 4]))]
    if dynamic:  # a second shape: the graph is compiled again, dynamic in T and N
        calls[1] = (7, torch.tensor([2, 7, 6, 3]))
    for training in (True, False):
        net.train(training)
        eager.train(training)
        for call, (T, lens) in enumerate(calls):
            x = rnd(gen, T, len(lens), 3).float()
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            got, want = compiled(xa, lens), eager(xb, lens)
            for i, (g, w) in enumerate(zip(got, want)):
                assert_close(g, w, torch.float32, "forward", f"training={training} call {call}: output {i}")
            if training:
                gs = [rnd(gen, *t.shape).float() for t in want]
                torch.autograd.backward(list(got), gs)
                torch.autograd.backward(list(want), gs)
                assert_close(xa.grad, xb.grad, torch.float32, "grad", "input")
                for (n, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
                    assert_close(p.grad, q.grad, torch.float32, "grad", n)
            for (n, b), (_, e) in zip(net.named_buffers(), eager.named_buffers()):
                if b.is_floating_point():
                    assert_close(b, e, torch.float32, "stats", f"training={training} call {call}: {n}")
                else:
                    assert torch.equal(b, e), n
    torch._dynamo.reset()


def test_torch_compile_bnlstm_aot_eager():
    """Graph capture (fullgraph: the fake kernels, no graph break) and AOT
    autograd of a BNLSTM model with lengths, training and eval: outputs,
    gradients and running statistics equal eager's."""
    _check_compiled(SequenceNet(with_rnn=False), "aot_eager", dynamic=False)


@pytest.mark.slow  # inductor compiles forward and backward for two shapes: ~30 s
def test_torch_compile_sequence_net_inductor():
    """The whole model (BNLSTM, SequenceBatchNorm1d, BNRNN) compiled with
    inductor, called with two input shapes (the second compiles a graph
    dynamic in T and N): outputs, gradients and running statistics equal
    eager's, in training and eval."""
    _check_compiled(SequenceNet(with_rnn=True), "inductor", dynamic=True)

"""torchnorm's sequence-norm ops (masked_batch_norm, bn_lstm_layer and their
backward) through torchnorm.functional, against the float64 references of
torchnorm.reference (themselves checked against per-step F.batch_norm
compositions in tests/test_sequence_references.py, whose cases this file
reuses):

- float64: outputs, h_n / c_n, the gradients of everything (input, h0, c0,
  every parameter) and the running statistics of every step after several
  training calls; train and eval; with and without (unsorted) lengths, a
  length-0 sequence and steps where one sequence is left; T > max_length;
  first_step (a sequence split in two calls equals one call);
- a step with one sequence left (variance 0: the output the docstrings
  state, zero input gradient); non-contiguous arguments; bn_lstm_layer_backward
  returning separate tensors;
- padded batches: in eval each sequence equals that sequence run alone over
  its valid prefix; in training the padded values change nothing;
- masked_batch_norm (recurrent_batch_norm_step, sequence_batch_norm) with
  masks, per-step and shared running statistics; its variance at a large
  mean; bitwise repeatable results on inputs split into several chunks;
- gradcheck of masked_batch_norm and bn_lstm_layer (float64, small);
- float32 and bfloat16 on the fused kernels against the float64 reference;
- bad input: a clear error, running statistics untouched.
(opcheck: tests/test_opcheck.py, samples in tests/op_samples.py; the modules:
tests/test_sequence_modules.py.)
"""
import pytest
import torch

import torchnorm  # noqa: F401  (registers the ops)
import torchnorm.functional as tnf
import torchnorm.reference as tnref
from conftest import DEVICES, StatsUnchanged, apply_layout, assert_close, assert_grads_close, expect_error, to64
from test_sequence_references import NAMES, clone_stats, lstm_case, rnd, stats
from tolerances import BN_LSTM_BF16_GRAD, GRADCHECK, LARGE_MEAN_VARIANCE

OPS = torch.ops.torchnorm
D = torch.float64
GRAD_NAMES = ["x", "h0", "c0"] + NAMES
KEYS = ("ih", "hh", "c")
BIAS = 5  # the bias' index in GRAD_NAMES

# Lengths of a T=5, N=5 batch (None: every sequence runs all 5 steps).
LENGTHS = {
    "full": None,
    # unsorted
    "unsorted": [5, 2, 5, 3, 4],
    # unsorted, one sequence of length 0, and steps 3 and 4 with one sequence
    # left (variance 0: gates from the bias alone, zero input gradient)
    "zero-one-left": [2, 0, 5, 3, 1],
}


# ---------------------------------------------------------------------------
# Helpers: one case (tests/test_sequence_references.lstm_case) as leaves of a
# dtype on a device, run through torchnorm.functional.bn_lstm or the
# reference, with gradients.
# ---------------------------------------------------------------------------


def case_leaves(case, dtype=D, device="cpu", pdtype=None, bias=True):
    """[x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, b_c] as leaves requiring
    grad: the input, states and matrices in dtype, the BN parameters (and
    bias) in pdtype (default dtype); b None without a bias."""
    x, h0, c0, p, _ = case
    pdtype = pdtype or dtype
    out = []
    for i, v in enumerate([x, h0, c0] + [p[k] for k in NAMES]):
        dt = pdtype if i >= BIAS else dtype
        out.append(v.to(device=device, dtype=dt).detach().requires_grad_())
    if not bias:
        out[BIAS] = None
    return out


def stats_on(st, dtype, device="cpu"):
    """A copy of running statistics {key: (mean, var)} in dtype on device
    (None stays None)."""
    return {k: tuple(None if t is None else t.detach().to(device=device, dtype=dtype).clone() for t in mv)
            for k, mv in st.items()}


def no_stats():
    return {k: (None, None) for k in KEYS}


def ours(leaves, st, training, momentum=0.1, eps=1e-5, lengths=None, first_step=0):
    return tnf.bn_lstm(*leaves, st, training, momentum, eps, lengths, first_step)


def reference(leaves, st, training, momentum=0.1, eps=1e-5, lengths=None):
    return tnref.bn_lstm(*leaves, st, training, momentum, eps, lengths)


def incoming_grads(shapes, seed, which="all"):
    """Seeded float64 gradients for (output, h_n, c_n); None where `which`
    leaves one out ("all", "output", "h_n", "c_n")."""
    gen = torch.Generator().manual_seed(seed)
    gs = [rnd(gen, *s) for s in shapes]
    if which == "all":
        return gs
    return [g if name == which else None for g, name in zip(gs, ("output", "h_n", "c_n"))]


def backward_of(results, grads, leaves):
    """Gradients of sum(result * grad) (grads cast to each result's dtype and
    device) with respect to the leaves that are not None."""
    out, (hn, cn) = results
    pairs = [(r, g.to(r)) for r, g in zip((out, hn, cn), grads) if g is not None]
    present = [t for t in leaves if t is not None]
    got = torch.autograd.grad([r for r, _ in pairs], present, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in leaves]


def assert_results_close(got, expected, dtype, msg):
    (out, (hn, cn)), (out_e, (hn_e, cn_e)) = got, expected
    assert_close(out, out_e, dtype, "forward", f"{msg}: output")
    assert_close(hn, hn_e, dtype, "forward", f"{msg}: h_n")
    assert_close(cn, cn_e, dtype, "forward", f"{msg}: c_n")


def assert_stats_close(st, st_ref, dtype, msg, kind="stats"):
    for k in KEYS:
        for name, t, e in zip(("running_mean", "running_var"), st[k], st_ref[k]):
            assert_close(t, e, dtype, kind, f"{msg}: {k} {name}")


def assert_stats_equal(st, st0, msg):
    for k in KEYS:
        for t, e in zip(st[k], st0[k]):
            assert torch.equal(t, e), f"{msg}: {k} running statistics changed"


def padding_of(lengths, T, N):
    """(T, N) bool of the padded positions (all False without lengths)."""
    if lengths is None:
        return torch.zeros(T, N, dtype=torch.bool)
    return torch.arange(T).unsqueeze(1) >= torch.as_tensor(lengths).unsqueeze(0)


# ---------------------------------------------------------------------------
# bn_lstm (the bn_lstm_layer op) against the float64 reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("L", [6, 2], ids=["max_length>=T", "max_length<T"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("H", [4, 45])
def test_bn_lstm_matches_reference(device, training, L, lengths, H):
    """Three calls in a row (new inputs each time, running statistics carried
    over): outputs, h_n, c_n and every step's running statistics after each
    call; then the gradients of input, h0, c0 and every parameter. Padded
    outputs and padded input gradients are exactly 0; eval leaves the running
    statistics exactly as they were. H = 45: the CPU kernels' blocks of 32
    hidden units, whole vectors and a tail."""
    T, N, I, momentum, eps = 5, 5, 3, 0.2, 1e-4
    lens = None if LENGTHS[lengths] is None else torch.tensor(LENGTHS[lengths])
    pad = padding_of(lens, T, N)
    st0 = lstm_case(20, T, N, I, H, L)[4]
    st, st_ref = stats_on(st0, D, device), clone_stats(st0)
    for call in range(3):
        case = lstm_case(20 + call, T, N, I, H, L)
        mine, ref = case_leaves(case, D, device), case_leaves(case)
        got = ours(mine, st, training, momentum, eps, None if lens is None else lens.to(device))
        expected = reference(ref, st_ref, training, momentum, eps, lens)
        msg = f"call {call}"
        assert_results_close(got, expected, D, msg)
        assert_stats_close(st, st_ref, D, msg)
        if not training:
            assert_stats_equal(st, stats_on(st0, D, device), msg)
        assert torch.equal(got[0][pad.to(device)], torch.zeros_like(got[0][pad.to(device)])), "padded outputs"
    grads = incoming_grads([t.shape for t in (expected[0], *expected[1])], seed=5)
    g = backward_of(got, grads, mine)
    g_ref = backward_of(expected, grads, ref)
    assert_grads_close(GRAD_NAMES, g, g_ref, D)
    assert (g[0][pad.to(device)] == 0).all(), "padded positions' input gradient"


@pytest.mark.parametrize("which", ["output", "h_n", "c_n"])
@pytest.mark.parametrize("lengths", ["full", "zero-one-left"])
def test_bn_lstm_partial_incoming_gradients(lengths, which):
    """Only one of output, h_n, c_n is used (the others' gradients are absent,
    not zero tensors): every gradient still matches the reference's."""
    T, N, I, H = 5, 5, 3, 4
    lens = None if LENGTHS[lengths] is None else torch.tensor(LENGTHS[lengths])
    case = lstm_case(30, T, N, I, H, 3)
    mine, ref = case_leaves(case), case_leaves(case)
    got = ours(mine, stats_on(case[4], D), True, lengths=lens)
    expected = reference(ref, clone_stats(case[4]), True, lengths=lens)
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=31, which=which)
    assert_grads_close(GRAD_NAMES, backward_of(got, grads, mine), backward_of(expected, grads, ref), D)


@pytest.mark.parametrize("lengths", ["full", "zero-one-left"])
def test_bn_lstm_without_bias_or_running_stats(lengths):
    """bias None (gates without the shift) and training without running
    statistics (None for all three BNs): the reference's outputs and
    gradients."""
    T, N, I, H = 5, 5, 3, 4
    lens = None if LENGTHS[lengths] is None else torch.tensor(LENGTHS[lengths])
    case = lstm_case(32, T, N, I, H, 3)
    mine, ref = case_leaves(case, bias=False), case_leaves(case, bias=False)
    got = ours(mine, no_stats(), True, lengths=lens)
    expected = reference(ref, clone_stats(case[4]), True, lengths=lens)
    assert_results_close(got, expected, D, "no bias, no running statistics")
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=33)
    assert_grads_close(GRAD_NAMES, backward_of(got, grads, mine), backward_of(expected, grads, ref), D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_bn_lstm_one_sequence_left(device, dtype):
    """What the issue asks the docstring to say about a step where only one
    sequence is still running (training): it is normalized with variance 0,
    so both gate BNs give 0 and BN_c gives bn_c_bias: h_t = sigmoid(bias_o)
    * tanh(bn_c_bias) whatever its input, its input gradient there is exactly
    0, and that step's running variances are updated with variance 0."""
    T, N, I, H, L, momentum = 5, 5, 3, 4, 6, 0.25
    lens = torch.tensor(LENGTHS["zero-one-left"], device=device)  # steps 3 and 4: sequence 2 alone
    case = lstm_case(70, T, N, I, H, L)
    leaves = case_leaves(case, dtype, device)
    st = stats_on(case[4], dtype, device)
    before = stats_on(st, dtype, device)
    out, (hn, cn) = ours(leaves, st, True, momentum, 1e-5, lens)
    b, b_c = leaves[BIAS].detach(), leaves[-1].detach()
    alone = (torch.sigmoid(b[3 * H:].double()) * torch.tanh(b_c.double())).expand(2, H)
    assert_close(out[3:, 2], alone, dtype, "forward", "h at the steps with one sequence left")
    grad_x = torch.autograd.grad((out.sum() + hn.sum() + cn.sum()), leaves[0])[0]
    assert torch.equal(grad_x[3:, 2], torch.zeros_like(grad_x[3:, 2])), "input gradient with one sequence left"
    assert (grad_x[:3, 2] != 0).any()
    for k in KEYS:
        assert_close(st[k][1][3:5], (1 - momentum) * before[k][1][3:5].double(), dtype, "stats",
                     f"{k} running_var with one sequence left")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_lstm_steps_beyond_max_length_use_the_last_row(training):
    """first_step far beyond max_length: every step uses (and in training
    updates) the last row of the running statistics, so the call equals the
    reference with max_length 1 holding that row; the other rows are left
    exactly as they were."""
    T, N, I, H, L = 4, 5, 3, 4, 3
    case = lstm_case(34, T, N, I, H, L)
    st = stats_on(case[4], D)
    before = stats_on(st, D)
    last = {k: (m[L - 1:].clone(), v[L - 1:].clone()) for k, (m, v) in case[4].items()}
    mine, ref = case_leaves(case), case_leaves(case)
    got = ours(mine, st, training, first_step=10 * L)
    expected = reference(ref, last, training)
    assert_results_close(got, expected, D, "first_step beyond max_length")
    for k in KEYS:
        for t, t0, e in zip(st[k], before[k], last[k]):
            assert torch.equal(t[: L - 1], t0[: L - 1]), f"{k}: rows before the last changed"
            assert_close(t[L - 1:], e, D, "stats", f"{k}: last row")
            if training:
                assert not torch.equal(t[L - 1], t0[L - 1]), f"{k}: last row not updated"


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("split", [1, 3])
def test_bn_lstm_first_step_split_equals_one_call(lengths, split):
    """A sequence run in two calls, steps [0, split) and then [split, T) with
    first_step=split from the first call's h_n / c_n (truncated BPTT),
    equals one call over all T steps (T > max_length): outputs, h_n, c_n,
    running statistics, and the gradients of everything, which reach the
    first call through h_n and c_n."""
    T, N, I, H, L = 5, 5, 3, 4, 2
    lens = None if LENGTHS[lengths] is None else torch.tensor(LENGTHS[lengths])
    case = lstm_case(35, T, N, I, H, L)
    whole, parts = case_leaves(case), case_leaves(case)
    st_whole, st_parts = stats_on(case[4], D), stats_on(case[4], D)
    expected = ours(whole, st_whole, True, lengths=lens)

    x, h0, c0, *params = parts
    first_lens = None if lens is None else lens.clamp(max=split)
    rest_lens = None if lens is None else (lens - split).clamp(min=0)
    out1, (h1, c1) = tnf.bn_lstm(x[:split], h0, c0, *params, st_parts, True, 0.1, 1e-5, first_lens, 0)
    out2, (h2, c2) = tnf.bn_lstm(x[split:], h1, c1, *params, st_parts, True, 0.1, 1e-5, rest_lens, split)
    got = (torch.cat([out1, out2]), (h2, c2))
    assert_results_close(got, expected, D, f"split at {split}")
    assert_stats_close(st_parts, st_whole, D, f"split at {split}")
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=36)
    assert_grads_close(GRAD_NAMES, backward_of(got, grads, parts), backward_of(expected, grads, whole), D)
    # and the whole call is the reference's
    assert_results_close(expected, reference(case_leaves(case), clone_stats(case[4]), True, lengths=lens), D,
                         "one call")


def test_bn_lstm_unsorted_lengths_equal_the_sorted_permuted_run():
    """Lengths in any order: permuting the batch (to sorted lengths) permutes
    outputs, h_n, c_n and gradients, and gives the same running statistics;
    int32 lengths and a Python list equal int64 lengths."""
    T, N, I, H = 5, 5, 3, 4
    lens = torch.tensor(LENGTHS["zero-one-left"])
    perm = torch.argsort(lens, descending=True, stable=True)
    case = lstm_case(37, T, N, I, H, 3)
    a, b = case_leaves(case), case_leaves(case)
    st_a, st_b = stats_on(case[4], D), stats_on(case[4], D)
    got = ours(a, st_a, True, lengths=lens)
    xb, h0b, c0b, *pb = b
    sorted_run = tnf.bn_lstm(xb[:, perm], h0b[perm], c0b[perm], *pb, st_b, True, 0.1, 1e-5, lens[perm])
    inv = torch.argsort(perm)
    assert_results_close(got, (sorted_run[0][:, inv], (sorted_run[1][0][inv], sorted_run[1][1][inv])), D,
                         "unsorted vs sorted")
    assert_stats_close(st_a, st_b, D, "unsorted vs sorted")
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=38)
    g_sorted = [grads[0][:, perm], grads[1][perm], grads[2][perm]]
    assert_grads_close(GRAD_NAMES, backward_of(got, grads, a), backward_of(sorted_run, g_sorted, b), D)

    for other in (lens.to(torch.int32), lens.tolist()):
        again = ours(case_leaves(case), stats_on(case[4], D), True, lengths=other)
        assert_results_close(again, got, D, f"lengths as {type(other).__name__}")


def _laid_out(t, layout):
    """t (detached) in a non-contiguous layout: "sliced" (every other element
    of a wider buffer) or "transposed" (last two dims swapped in memory; a
    1-d tensor is sliced)."""
    t = t.detach()
    return apply_layout(t, layout if t.dim() >= 2 else "sliced")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_lstm_non_contiguous_arguments(device, training, layout):
    """Input, states, weights, BN parameters and running statistics (updated
    in place through the views) all non-contiguous: the reference's results,
    gradients and running statistics."""
    T, N, I, H = 5, 5, 3, 4
    lens = torch.tensor(LENGTHS["zero-one-left"])
    case = lstm_case(72, T, N, I, H, 3)
    mine = [_laid_out(v, layout).requires_grad_() for v in case_leaves(case, D, device)]
    st = {k: tuple(_laid_out(t, layout) for t in mv) for k, mv in stats_on(case[4], D, device).items()}
    assert not any(t.is_contiguous() for mv in st.values() for t in mv)
    ref, st_ref = case_leaves(case), clone_stats(case[4])
    got = ours(mine, st, training, lengths=lens.to(device))
    expected = reference(ref, st_ref, training, lengths=lens)
    assert_results_close(got, expected, D, layout)
    assert_stats_close(st, st_ref, D, layout)
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=73)
    assert_grads_close(GRAD_NAMES, backward_of(got, grads, mine), backward_of(expected, grads, ref), D)


def test_bn_lstm_lengths_all_T_equal_no_lengths():
    T, N, I, H = 5, 5, 3, 4
    case = lstm_case(39, T, N, I, H, 3)
    st_a, st_b = stats_on(case[4], D), stats_on(case[4], D)
    a = ours(case_leaves(case), st_a, True, lengths=torch.full((N,), T))
    b = ours(case_leaves(case), st_b, True)
    assert_results_close(a, b, D, "lengths all T")
    assert_stats_close(st_a, st_b, D, "lengths all T")


@pytest.mark.parametrize("device", DEVICES)
def test_bn_lstm_eval_padded_batch_equals_each_sequence_alone(device):
    """Eval (fixed running statistics): each sequence of a padded batch gives
    what that sequence gives run alone (a batch of one) over its valid prefix:
    outputs, h_n, c_n; a length-0 sequence (T = 0 alone) keeps h0 / c0."""
    T, N, I, H = 5, 5, 3, 4
    lens = LENGTHS["zero-one-left"]
    case = lstm_case(40, T, N, I, H, 3)
    st = stats_on(case[4], D, device)
    x, h0, c0, *params = case_leaves(case, D, device)
    out, (hn, cn) = tnf.bn_lstm(x, h0, c0, *params, st, False, 0.1, 1e-5, torch.tensor(lens, device=device))
    for n, length in enumerate(lens):
        one = slice(n, n + 1)
        out_n, (hn_n, cn_n) = tnf.bn_lstm(x[:length, one], h0[one], c0[one], *params, st, False)
        assert_close(out[:length, n], out_n[:, 0], D, "forward", f"sequence {n}: output")
        assert torch.equal(out[length:, n], torch.zeros_like(out[length:, n])), f"sequence {n}: padded output"
        assert_close(hn[n], hn_n[0], D, "forward", f"sequence {n}: h_n")
        assert_close(cn[n], cn_n[0], D, "forward", f"sequence {n}: c_n")
        if length == 0:
            assert torch.equal(hn[n], h0[n]) and torch.equal(cn[n], c0[n]), "length 0 keeps h0 / c0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_bn_lstm_training_ignores_padded_values(device, dtype):
    """Training: replacing the padded inputs by large garbage changes no
    output, final state, running statistic or gradient; the padded inputs'
    gradients are exactly 0."""
    T, N, I, H = 5, 5, 3, 4
    lens = torch.tensor(LENGTHS["zero-one-left"], device=device)
    pad = padding_of(lens.cpu(), T, N).to(device)
    case = lstm_case(41, T, N, I, H, 3)
    gen = torch.Generator().manual_seed(42)
    garbage = torch.where(pad.cpu().unsqueeze(2), rnd(gen, T, N, I, scale=1e3), case[0])
    runs = []
    for x in (case[0], garbage):
        leaves = case_leaves((x,) + case[1:], dtype, device)
        st = stats_on(case[4], dtype, device)
        res = ours(leaves, st, True, lengths=lens)
        grads = backward_of(res, incoming_grads([(T, N, H), (N, H), (N, H)], seed=43), leaves)
        assert torch.equal(grads[0][pad], torch.zeros_like(grads[0][pad])), "padded input gradient"
        runs.append((res, st, grads))
    (res_a, st_a, g_a), (res_b, st_b, g_b) = runs
    assert_results_close(res_b, res_a, dtype, "garbage padding")
    assert_stats_close(st_b, st_a, dtype, "garbage padding")
    assert_grads_close(GRAD_NAMES, g_b, g_a, dtype)


# ---------------------------------------------------------------------------
# masked_batch_norm (recurrent_batch_norm_step, sequence_batch_norm) against
# the float64 reference
# ---------------------------------------------------------------------------


def masks(N, T, seed):
    """T bool (N,) masks: random ones, then one valid row, then none."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(T):
        if t == T - 2:
            m = torch.zeros(N, dtype=torch.bool)
            m[N // 2] = True
        elif t == T - 1:
            m = torch.zeros(N, dtype=torch.bool)
        else:
            m = torch.rand(N, generator=gen) < 0.6
            m[t % N] = m[(t + 1) % N] = True
        out.append(m)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_recurrent_batch_norm_step_matches_reference(device, training, masked, affine):
    """Steps 0..6 with max_length 3 (steps 2..6 share the last row): outputs,
    the gradients of input, weight and bias, the running statistics after
    every step, and the op's returned mean / rstd (the valid rows' batch
    statistics in training, the step's running row in eval). The masks
    include one valid row and none."""
    N, C, L, T, momentum, eps = 6, 5, 3, 7, 0.2, 1e-3
    gen = torch.Generator().manual_seed(44)
    rm, rv = stats(gen, L, C)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm, rv = rm.to(device), rv.to(device)
    w, b = (rnd(gen, C), rnd(gen, C)) if affine else (None, None)
    for t, mask in enumerate(masks(N, T, 45)):
        x = rnd(gen, N, C, scale=2.0, shift=1.0)
        gy = rnd(gen, N, C)
        xa, wa, ba = (None if v is None else v.to(device).requires_grad_() for v in (x, w, b))
        xr, wr, br = (None if v is None else v.clone().requires_grad_() for v in (x, w, b))
        m = mask.to(device) if masked else None
        y, mean, rstd = OPS.masked_batch_norm(xa, m, wa, ba, rm, rv, t, training, momentum, eps)
        y_ref = tnref.recurrent_batch_norm_step(xr, t, rm_ref, rv_ref, wr, br, training, momentum, eps,
                                                mask if masked else None)
        msg = f"step {t}"
        assert_close(y, y_ref, D, "forward", msg)
        assert_close(rm, rm_ref, D, "stats", f"{msg}: running_mean")
        assert_close(rv, rv_ref, D, "stats", f"{msg}: running_var")
        valid = mask if masked else torch.ones(N, dtype=torch.bool)
        row = min(t, L - 1)
        if training and valid.any():
            rows = x[valid]
            assert_close(mean, rows.mean(0), D, "stats", f"{msg}: mean")
            assert_close(rstd, (rows.var(0, unbiased=False) + eps).rsqrt(), D, "stats", f"{msg}: rstd")
        elif not training:
            assert_close(mean, rm_ref[row], D, "stats", f"{msg}: mean")
            assert_close(rstd, (rv_ref[row] + eps).rsqrt(), D, "stats", f"{msg}: rstd")
        assert torch.equal(y[~valid.to(device)], torch.zeros_like(y[~valid.to(device)])), f"{msg}: masked rows"
        leaves = [v for v in (xa, wa, ba) if v is not None]
        got = torch.autograd.grad(y, leaves, gy.to(device))
        want = torch.autograd.grad(y_ref, [v for v in (xr, wr, br) if v is not None], gy)
        assert_grads_close(["x", "weight", "bias"][: len(got)], got, want, D)
        assert torch.equal(got[0][~valid.to(device)], torch.zeros_like(got[0][~valid.to(device)])), \
            f"{msg}: masked rows' gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["TNC", "NTC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequence_batch_norm_matches_reference(device, training, batch_first):
    """Unsorted lengths with a length-0 sequence, two calls in a row: output,
    input / weight / bias gradients (exact 0 at padded positions) and the
    (C,) running statistics."""
    T, N, C, momentum, eps = 5, 4, 3, 0.3, 1e-3
    lens = torch.tensor([2, 5, 0, 3])
    gen = torch.Generator().manual_seed(46)
    rm, rv = rnd(gen, C), rnd(gen, C).abs() + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm, rv = rm.to(device), rv.to(device)
    w, b = rnd(gen, C), rnd(gen, C)
    pad = padding_of(lens, T, N)
    if batch_first:
        pad = pad.t()
    for call in range(2):
        shape = (N, T, C) if batch_first else (T, N, C)
        x, gy = rnd(gen, *shape, scale=2.0, shift=1.0), rnd(gen, *shape)
        xa, wa, ba = (v.to(device).requires_grad_() for v in (x, w, b))
        xr, wr, br = (v.clone().requires_grad_() for v in (x, w, b))
        y = tnf.sequence_batch_norm(xa, rm, rv, wa, ba, training, momentum, eps, lens.to(device), batch_first)
        y_ref = tnref.sequence_batch_norm(xr, rm_ref, rv_ref, wr, br, training, momentum, eps, lens, batch_first)
        assert_close(y, y_ref, D, "forward", f"call {call}")
        assert torch.equal(y[pad.to(device)], torch.zeros_like(y[pad.to(device)])), "padded outputs"
        assert_close(rm, rm_ref, D, "stats", "running_mean")
        assert_close(rv, rv_ref, D, "stats", "running_var")
        got = torch.autograd.grad(y, [xa, wa, ba], gy.to(device))
        assert_grads_close(["x", "weight", "bias"], got, torch.autograd.grad(y_ref, [xr, wr, br], gy), D)
        assert torch.equal(got[0][pad.to(device)], torch.zeros_like(got[0][pad.to(device)])), "padded gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_masked_batch_norm_large_mean_variance(device):
    """float32 rows of mean 1e4 and std ~1 (a third of them masked out): the
    batch variance recovered from the returned rstd, 1 / rstd**2 - eps,
    against the float64 variance of the same valid float32 values (a
    one-pass E[x^2] - E[x]^2 in float32 would be off by ~10)."""
    gen = torch.Generator().manual_seed(55)
    x = (rnd(gen, 4096, 16) + 1e4).float()
    mask = torch.rand(4096, generator=gen) < 0.67
    _, mean, rstd = OPS.masked_batch_norm(x.to(device), mask.to(device), None, None, None, None, 0, True, 0.1, 1e-5)
    rows = x[mask].double()
    var = 1.0 / rstd.double().cpu() ** 2 - 1e-5
    torch.testing.assert_close(var, rows.var(0, unbiased=False), **LARGE_MEAN_VARIANCE)
    assert_close(mean, rows.mean(0), torch.float32, "stats", "mean")


@pytest.mark.parametrize("device", DEVICES)
def test_results_are_bitwise_repeatable(device):
    """Inputs large enough for the kernels' parallel column sums (several
    chunks of rows): two runs give bitwise equal outputs, statistics and
    gradients (sums in fixed chunks, no atomics)."""
    gen = torch.Generator().manual_seed(56)
    x = rnd(gen, 8192, 64).float().to(device)
    mask = (torch.rand(8192, generator=gen) < 0.5).to(device)
    w, b = rnd(gen, 64).float().to(device), rnd(gen, 64).float().to(device)
    runs = []
    for _ in range(2):
        xa, wa, ba = (v.clone().requires_grad_() for v in (x, w, b))
        y, mean, rstd = OPS.masked_batch_norm(xa, mask, wa, ba, None, None, 0, True, 0.1, 1e-5)
        runs.append((y, mean, rstd, *torch.autograd.grad(y, [xa, wa, ba], torch.ones_like(y))))
    assert all(torch.equal(u, v) for u, v in zip(*runs)), "masked_batch_norm not repeatable"

    T, N, I, H = 2, 512, 16, 64
    case = lstm_case(57, T, N, I, H, 3)
    lens = torch.randint(0, T + 1, (N,), generator=gen).to(device)
    runs = []
    for _ in range(2):
        leaves = case_leaves(case, torch.float32, device)
        st = stats_on(case[4], torch.float32, device)
        out, (hn, cn) = ours(leaves, st, True, lengths=lens)
        grads = torch.autograd.grad(out.sum() + (hn * hn).sum() + (cn * cn).sum(), leaves)
        runs.append((out, hn, cn, *[t for mv in st.values() for t in mv], *grads))
    assert all(torch.equal(u, v) for u, v in zip(*runs)), "bn_lstm not repeatable"


def test_cpu_results_do_not_depend_on_the_thread_count():
    """The CPU column sums take row chunks set by the sizes alone: one thread
    and two give bitwise equal outputs, statistics and gradients."""
    gen = torch.Generator().manual_seed(58)
    x = rnd(gen, 8192, 64).float()
    mask = torch.rand(8192, generator=gen) < 0.5
    w, b = rnd(gen, 64).float(), rnd(gen, 64).float()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xa, wa, ba = (v.clone().requires_grad_() for v in (x, w, b))
            y, mean, rstd = OPS.masked_batch_norm(xa, mask, wa, ba, None, None, 0, True, 0.1, 1e-5)
            runs.append((y, mean, rstd, *torch.autograd.grad(y, [xa, wa, ba], torch.ones_like(y))))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(*runs)), "masked_batch_norm depends on the thread count"

    T, N, I, H = 3, 64, 16, 96  # three blocks of hidden units
    case = lstm_case(59, T, N, I, H, 3)
    lens = torch.randint(0, T + 1, (N,), generator=gen)
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = case_leaves(case, torch.float32)
            st = stats_on(case[4], torch.float32)
            out, (hn, cn) = ours(leaves, st, True, lengths=lens)
            grads = torch.autograd.grad(out.sum() + (hn * hn).sum() + (cn * cn).sum(), leaves)
            runs.append((out, hn, cn, *[t for mv in st.values() for t in mv], *grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(*runs)), "bn_lstm depends on the thread count"


# ---------------------------------------------------------------------------
# gradcheck (float64, small)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_step", [True, False], ids=["per-step-stats", "shared-stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masked_batch_norm_gradcheck(training, per_step):
    gen = torch.Generator().manual_seed(47)
    N, C, L = 5, 3, 2
    rm, rv = stats(gen, L, C)
    if not per_step:
        rm, rv = rm[0].clone(), rv[0].clone()
    mask = torch.tensor([True, False, True, True, False])
    args = tuple(v.requires_grad_() for v in (rnd(gen, N, C, scale=2.0), rnd(gen, C), rnd(gen, C)))

    def fn(x, w, b):
        return OPS.masked_batch_norm(x, mask, w, b, rm.clone(), rv.clone(), 4, training, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


@pytest.mark.parametrize("lengths", [None, [3, 1, 2], [3, 0, 2]], ids=["full", "one-left", "zero"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_lstm_layer_gradcheck(training, lengths):
    """bn_lstm_layer with respect to input_gates, hx, cx, weight_hh, bias and
    the four BN parameters, from output, h_n and c_n (T > max_length)."""
    T, N, I, H, L = 3, 3, 2, 2, 2
    x, h0, c0, p, st = lstm_case(48, T, N, I, H, L)
    lens = None if lengths is None else torch.tensor(lengths)
    gates = x @ p["w_ih"].t()
    args = tuple(v.clone().requires_grad_() for v in (gates, h0, c0, *[p[k] for k in NAMES[1:]]))

    def fn(*a):
        s = clone_stats(st)
        out = OPS.bn_lstm_layer(*a, *s["ih"], *s["hh"], *s["c"], lens, 0, training, 0.1, 1e-5)
        return out[:3]

    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_lstm_layer_backward_returns_separate_tensors(device, dtype):
    """bn_lstm_layer_backward's schema returns nine new tensors: no two of them
    may share memory (a caller, autograd or a compiled graph, may write into
    one gradient without touching another). tests/test_opcheck.py's
    test_schema checks the same on the op_samples cases."""
    args, _ = _layer_args(device, None)
    t, r = [v.to(dtype) for v in args[:9]], [v.to(dtype) for v in args[9:15]]
    with torch.no_grad():
        output, hy, cy, hidden_gates, cells, st = OPS.bn_lstm_layer(*t, *r, None, 0, True, 0.1, 1e-5)
    grads = OPS.bn_lstm_layer_backward(torch.ones_like(output), None, None, *t, output, hidden_gates, cells, st,
                                       None, True)
    names = ["input_gates", "hx", "cx", "weight_hh", "bias", "bn_ih_weight", "bn_hh_weight", "bn_c_weight",
             "bn_c_bias"]
    shared = [(names[i], names[j]) for i in range(9) for j in range(i + 1, 9)
              if grads[i].untyped_storage().data_ptr() == grads[j].untyped_storage().data_ptr()]
    assert not shared, f"gradients sharing memory: {shared}"


# ---------------------------------------------------------------------------
# float32 and bfloat16 against the float64 reference
# ---------------------------------------------------------------------------

# (input dtype, BN parameters' and running statistics' dtype)
LOW_PRECISION = [
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-f32params"),
]


# unsorted lengths of a batch of 16 over 5 steps, one of them 0
LOW_PRECISION_LENGTHS = [5, 3, 0, 5, 4, 2, 5, 1, 5, 3, 4, 5, 2, 5, 4, 3]


def assert_grads_close_bf16(names, grads, expected, inputs):
    """bfloat16 BN-LSTM gradients: each in its input's dtype, close to the
    float64 one norm-wise (tests/tolerances.py: BN_LSTM_BF16_GRAD)."""
    for name, g, e, t in zip(names, grads, expected, inputs):
        if e is None:
            continue
        assert g is not None and g.dtype == t.dtype, f"{name}: {None if g is None else g.dtype}, expected {t.dtype}"
        e = e.detach().double().cpu()
        torch.testing.assert_close(g.detach().double().cpu(), e,
                                   atol=BN_LSTM_BF16_GRAD["atol_scale"] * e.abs().max().item(),
                                   rtol=BN_LSTM_BF16_GRAD["rtol"], msg=lambda m: f"{name}\n{m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,pdtype", LOW_PRECISION)
@pytest.mark.parametrize("H", [8, 45])
def test_bn_lstm_low_precision_against_float64(device, dtype, pdtype, training, lengths, H):
    """The fused kernels in float32 / bfloat16 against the float64 reference
    run on the very same (rounded) inputs, parameters and running statistics:
    outputs, h_n, c_n, running statistics after two calls (each call's
    reference starting from the statistics the kernel stored), gradients (in
    the dtypes of their inputs). Padded outputs and input gradients exactly 0.
    H = 45: several blocks of hidden units, whole vectors and a tail."""
    T, N, I, L = 5, 16, 6, 3
    lens = torch.tensor(LOW_PRECISION_LENGTHS) if lengths else None
    pad = padding_of(lens, T, N).to(device)
    st = stats_on(lstm_case(50, T, N, I, H, L)[4], pdtype, device)
    for call in range(2):
        case = lstm_case(50 + call, T, N, I, H, L)
        mine = case_leaves(case, dtype, device, pdtype)
        ref = [to64(v) for v in mine]
        st_ref = stats_on(st, D)
        got = ours(mine, st, training, 0.2, 1e-4, None if lens is None else lens.to(device))
        expected = reference(ref, st_ref, training, 0.2, 1e-4, lens)
        assert got[0].dtype == dtype and got[1][0].dtype == dtype and got[1][1].dtype == dtype
        assert_results_close(got, expected, dtype, f"{dtype} call {call}")
        assert torch.equal(got[0][pad], torch.zeros_like(got[0][pad])), "padded outputs"
        # the reference's statistics rounded to the buffers' dtype, as stored
        assert_stats_close(st, stats_on(stats_on(st_ref, pdtype), D), dtype, f"{dtype} call {call}")
    grads = incoming_grads([(T, N, H), (N, H), (N, H)], seed=52)
    g, g_ref = backward_of(got, grads, mine), backward_of(expected, grads, ref)
    assert torch.equal(g[0][pad], torch.zeros_like(g[0][pad])), "padded input gradient"
    if dtype == torch.bfloat16:
        assert_grads_close_bf16(GRAD_NAMES, g, g_ref, mine)
    else:
        assert_grads_close(GRAD_NAMES, g, g_ref, dtype, inputs=mine)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,pdtype", LOW_PRECISION)
def test_masked_batch_norm_low_precision_against_float64(device, dtype, pdtype, training):
    """masked_batch_norm in float32 / bfloat16 (per-step statistics, a mask,
    a step past max_length) against the reference on the rounded values."""
    N, C, L = 16, 7, 2
    gen = torch.Generator().manual_seed(53)
    rm, rv = (v.to(pdtype) for v in stats(gen, L, C))
    x = rnd(gen, N, C, scale=2.0, shift=3.0).to(dtype)
    w, b = rnd(gen, C).to(pdtype), rnd(gen, C).to(pdtype)
    gy = rnd(gen, N, C).to(dtype)
    mask = torch.rand(N, generator=gen) < 0.7
    rm_ref, rv_ref = rm.double(), rv.double()
    xa, wa, ba = (v.to(device).requires_grad_() for v in (x, w, b))
    xr, wr, br = (to64(v).requires_grad_() for v in (x, w, b))
    rma, rva = rm.to(device), rv.to(device)
    y, _, _ = OPS.masked_batch_norm(xa, mask.to(device), wa, ba, rma, rva, 5, training, 0.1, 1e-5)
    y_ref = tnref.recurrent_batch_norm_step(xr, 5, rm_ref, rv_ref, wr, br, training, 0.1, 1e-5, mask)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "forward", "output")
    assert_close(rma, rm_ref.to(pdtype), dtype, "stats", "running_mean")
    assert_close(rva, rv_ref.to(pdtype), dtype, "stats", "running_var")
    got = torch.autograd.grad(y, [xa, wa, ba], gy.to(device))
    want = torch.autograd.grad(y_ref, [xr, wr, br], gy.double())
    assert_grads_close(["x", "weight", "bias"], got, want, dtype, inputs=[xa, wa, ba])


# ---------------------------------------------------------------------------
# Bad input: a clear error, running statistics untouched
# ---------------------------------------------------------------------------


def _lstm_call(device, **changes):
    """tnf.bn_lstm on a small case (T=4 > max_length=3, N=3, I=2, H=2) in
    training, with any argument replaced; returns (call, its running
    statistics). Arguments: x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, b_c,
    st, training, lengths, first_step."""
    x, h0, c0, p, st = lstm_case(60, 4, 3, 2, 2, 3)
    args = dict(x=x, h0=h0, c0=c0, **p, st=stats_on(st, D), training=True, lengths=torch.tensor([4, 1, 3]),
                first_step=0)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    args["st"] = stats_on(args["st"], D, device)
    args.update(changes)
    running = [t for mv in args["st"].values() for t in mv]

    def call():
        return tnf.bn_lstm(args["x"], args["h0"], args["c0"], *[args[k] for k in NAMES], args["st"],
                           args["training"], 0.1, 1e-5, args["lengths"], args["first_step"])

    return call, running


def _bad_stats(which, shape=None, drop=None):
    """Running statistics of _lstm_call's case with `which` BN's mean and var
    of another shape, or one of them (drop: 0 mean, 1 var) None."""
    st = stats_on(lstm_case(60, 4, 3, 2, 2, 3)[4], D)
    m, v = st[which]
    if shape is not None:
        m, v = torch.zeros(shape, dtype=D), torch.ones(shape, dtype=D)
    if drop is not None:
        m, v = (None, v) if drop == 0 else (m, None)
    st[which] = (m, v)
    return st


BAD_LSTM_CALLS = {
    # name: (changes, expected message)
    "input-size": (lambda: dict(x=torch.ones(4, 3, 5, dtype=D)), "expected input_size 2"),
    "unbatched-2d": (lambda: dict(x=torch.ones(4, 2, dtype=D)), r"expects a \(T, N, input_size\) input"),
    "lengths-longer": (lambda: dict(lengths=torch.tensor([4, 5, 3])), r"lengths must lie in \[0, 4\]"),
    "lengths-negative": (lambda: dict(lengths=torch.tensor([4, -1, 3])), r"lengths must lie in \[0, 4\]"),
    "lengths-shape": (lambda: dict(lengths=torch.tensor([4, 1])), r"lengths must have shape \(3,\)"),
    "lengths-2d": (lambda: dict(lengths=torch.tensor([[4, 1, 3]])), r"lengths must have shape \(3,\)"),
    "lengths-float": (lambda: dict(lengths=torch.tensor([4.0, 1.0, 3.0])), "lengths must be integers"),
    "first-step-negative": (lambda: dict(first_step=-1), "first time step >= 0"),
    "h0-shape": (lambda: dict(h0=torch.zeros(2, 2, dtype=D)), r"expected hx of shape \(3, 2\)"),
    "c0-dtype": (lambda: dict(c0=torch.zeros(3, 2)), "expected cx in Double"),
    "w_hh-shape": (lambda: dict(w_hh=torch.zeros(8, 3, dtype=D)), "weight_hh of shape"),
    "bias-shape": (lambda: dict(b=torch.zeros(7, dtype=D)), "expected bias of shape"),
    "bn_c_weight-shape": (lambda: dict(g_c=torch.ones(8, dtype=D)), "expected bn_c_weight of shape"),
    "stats-shape-c": (lambda: dict(st=_bad_stats("c", shape=(3, 8))), r"running statistics of shape \(2,\)"),
    "stats-shape-ih": (lambda: dict(st=_bad_stats("ih", shape=(3, 7))), r"running statistics of shape \(8,\)"),
    "stats-shape-empty": (lambda: dict(st=_bad_stats("hh", shape=(0, 8))), "max_length >= 1"),
    "stats-var-missing": (lambda: dict(st=_bad_stats("hh", drop=1)), "give both"),
    "eval-without-stats": (lambda: dict(st=no_stats(), training=False), "evaluation needs"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BAD_LSTM_CALLS))
def test_bn_lstm_bad_input(device, name):
    changes, match = BAD_LSTM_CALLS[name]
    changes = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in changes().items()}
    if "st" in changes:
        changes["st"] = stats_on(changes["st"], D, device)
    call, running = _lstm_call(device, **changes)
    expect_error(call, match, StatsUnchanged(*running))


def _layer_args(device, lengths):
    x, h0, c0, p, st = lstm_case(61, 4, 3, 2, 2, 3)
    st = stats_on(st, D, device)
    running = [t for mv in st.values() for t in mv]
    args = [v.to(device) for v in (x @ p["w_ih"].t(), h0, c0, *[p[k] for k in NAMES[1:]])]
    return args + running + [lengths, 0, True, 0.1, 1e-5], running


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,match", [
    pytest.param([4, 5, 3], r"lengths must lie in \[0, 4\]", id="longer"),
    pytest.param([4, 3], r"expected lengths of shape \(3,\)", id="shape"),
    pytest.param([4.0, 1.0, 3.0], "expected integer lengths", id="float"),
])
def test_bn_lstm_layer_op_bad_lengths(device, lengths, match):
    """The op checks lengths itself (not only torchnorm.functional)."""
    args, running = _layer_args(device, torch.tensor(lengths, device=device))
    expect_error(lambda: OPS.bn_lstm_layer(*args), match, StatsUnchanged(*running))


def _masked_args(device, **changes):
    gen = torch.Generator().manual_seed(62)
    rm, rv = stats(gen, 3, 4)
    args = dict(x=rnd(gen, 5, 4), valid=torch.tensor([True, True, False, True, False]), w=rnd(gen, 4),
                b=rnd(gen, 4), rm=rm, rv=rv, step=1, training=True)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()})
    return args


BAD_MASKED_CALLS = {
    "step-negative": (dict(step=-1), "expected time step >= 0"),
    "features": (dict(x=torch.ones(5, 3, dtype=D)), "expected weight of shape"),
    "unbatched-1d": (dict(x=torch.ones(4, dtype=D)), "expected a 2-d"),
    "mask-shape": (dict(valid=torch.ones(4, dtype=torch.bool)), r"expected valid of shape \(5,\)"),
    "mask-dtype": (dict(valid=torch.ones(5, dtype=torch.uint8)), "expected valid to be a bool tensor"),
    "stats-shape": (dict(rm=torch.zeros(3, 5, dtype=D), rv=torch.ones(3, 5, dtype=D)), "running statistics of shape"),
    "stats-3d": (dict(rm=torch.zeros(1, 3, 4, dtype=D), rv=torch.ones(1, 3, 4, dtype=D)),
                 "running statistics of shape"),
    "stats-mean-only": (dict(rv=None), "give both"),
    "eval-without-stats": (dict(rm=None, rv=None, training=False), "evaluation needs"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BAD_MASKED_CALLS))
def test_masked_batch_norm_bad_input(device, name):
    changes, match = BAD_MASKED_CALLS[name]
    a = _masked_args(device, **changes)
    expect_error(lambda: OPS.masked_batch_norm(a["x"], a["valid"], a["w"], a["b"], a["rm"], a["rv"], a["step"],
                                               a["training"], 0.1, 1e-5),
                 match, StatsUnchanged(a["rm"], a["rv"]))


@pytest.mark.parametrize("device", DEVICES)
def test_functional_bad_input(device):
    """recurrent_batch_norm_step refuses t < 0 before the op; sequence_batch_norm
    refuses lengths longer than the input and 2-d input."""
    a = _masked_args(device)
    expect_error(lambda: tnf.recurrent_batch_norm_step(a["x"], -1, a["rm"], a["rv"], a["w"], a["b"], True),
                 "t must be >= 0", StatsUnchanged(a["rm"], a["rv"]))
    x = torch.ones(3, 2, 4, dtype=D, device=device)
    rm, rv = a["rm"][0].clone(), a["rv"][0].clone()
    expect_error(lambda: tnf.sequence_batch_norm(x, rm, rv, None, None, True, lengths=torch.tensor([3, 4])),
                 r"lengths must lie in \[0, 3\]", StatsUnchanged(rm, rv))
    expect_error(lambda: tnf.sequence_batch_norm(x, rm, rv, None, None, True, lengths=torch.tensor([3, 1, 1])),
                 r"lengths must have shape \(2,\)", StatsUnchanged(rm, rv))
    expect_error(lambda: tnf.sequence_batch_norm(x[0], rm, rv, None, None, True), "3-d",
                 StatsUnchanged(rm, rv))

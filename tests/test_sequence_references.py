"""The float64 references of the sequence norms in torchnorm.reference:
recurrent_batch_norm_step, bn_lstm and sequence_batch_norm, against
compositions of torch.nn.functional.batch_norm per step (over the (T*N, C)
reshape for the sequence-wise BN), written here independently; the max_length
rule, masks and lengths, train and eval, running statistics, gradcheck.
All float64 and small.
"""
import pytest
import torch
import torch.nn.functional as F

import torchnorm.reference as tnref
from tolerances import GRADCHECK, tol

D = torch.float64


def rnd(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=D) * scale + shift


def close(actual, expected):
    # float64 against float64 (only the order of operations differs): the
    # table's float64 forward tolerance, its tightest, for every quantity.
    torch.testing.assert_close(actual, expected, **tol(D, "forward"))


def stats(gen, L, C):
    """Random nonzero (max_length, C) running statistics."""
    return rnd(gen, L, C, scale=0.5), rnd(gen, L, C).abs() + 0.5


# ---------------------------------------------------------------------------
# recurrent_batch_norm_step
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_step_training_against_batch_norm_per_step(affine, masked):
    """Several steps past max_length: each step's valid rows equal F.batch_norm
    on them with that step's row of the running statistics (the last row for
    t >= max_length), masked rows give 0, and the running statistics match."""
    gen = torch.Generator().manual_seed(0)
    N, C, L, T, momentum, eps = 6, 5, 3, 6, 0.2, 1e-3
    rm, rv = stats(gen, L, C)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    w, b = (rnd(gen, C), rnd(gen, C)) if affine else (None, None)
    for t in range(T):
        x = rnd(gen, N, C, scale=2.0, shift=1.0)
        mask = torch.rand(N, generator=gen) < 0.6 if masked else torch.ones(N, dtype=torch.bool)
        mask[:2] = True  # at least two valid rows: F.batch_norm raises for one
        y = tnref.recurrent_batch_norm_step(x, t, rm, rv, w, b, True, momentum, eps, mask if masked else None)
        row = min(t, L - 1)
        expected = F.batch_norm(x[mask], rm_ref[row], rv_ref[row], w, b, True, momentum, eps)
        close(y[mask], expected)
        assert (y[~mask] == 0).all()
        close(rm, rm_ref)
        close(rv, rv_ref)


def test_step_max_length_rule():
    """Steps at and beyond max_length update only the last row, and use it."""
    gen = torch.Generator().manual_seed(1)
    N, C, L = 4, 3, 2
    rm, rv = stats(gen, L, C)
    first_mean, first_var = rm[0].clone(), rv[0].clone()
    last = []
    for t in range(L - 1, L + 3):
        tnref.recurrent_batch_norm_step(rnd(gen, N, C), t, rm, rv, None, None, True)
        assert torch.equal(rm[0], first_mean) and torch.equal(rv[0], first_var)
        last.append(rm[L - 1].clone())
    assert all(not torch.equal(a, b) for a, b in zip(last, last[1:]))  # updated at every such step
    x = rnd(gen, N, C)
    for t in (L - 1, L, 10 * L):
        close(tnref.recurrent_batch_norm_step(x, t, rm, rv, None, None, False), F.batch_norm(x, rm[L - 1], rv[L - 1]))


def test_step_eval_uses_the_rows_running_statistics():
    gen = torch.Generator().manual_seed(2)
    N, C, L, eps = 5, 4, 3, 1e-3
    rm, rv = stats(gen, L, C)
    rm0, rv0 = rm.clone(), rv.clone()
    w, b = rnd(gen, C), rnd(gen, C)
    mask = torch.tensor([True, False, True, True, False])
    for t in range(L + 1):
        x = rnd(gen, N, C)
        y = tnref.recurrent_batch_norm_step(x, t, rm, rv, w, b, False, 0.1, eps, mask)
        row = min(t, L - 1)
        close(y[mask], F.batch_norm(x[mask], rm[row], rv[row], w, b, False, 0.1, eps))
        assert (y[~mask] == 0).all()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("training", [True, False])
def test_step_masked_rows_get_zero_gradient(training):
    """Masked rows: zero gradient; valid rows: F.batch_norm's gradients on them."""
    gen = torch.Generator().manual_seed(3)
    N, C, L = 6, 3, 2
    rm, rv = stats(gen, L, C)
    mask = torch.tensor([True, False, True, True, False, True])
    x0, w0, b0, g = rnd(gen, N, C), rnd(gen, C), rnd(gen, C), rnd(gen, N, C)
    x, w, b = (v.clone().requires_grad_() for v in (x0, w0, b0))
    y = tnref.recurrent_batch_norm_step(x, 1, rm.clone(), rv.clone(), w, b, training, mask=mask)
    (y * g).sum().backward()
    assert (x.grad[~mask] == 0).all()
    xv, wr, br = x0[mask].clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    (F.batch_norm(xv, rm[1].clone(), rv[1].clone(), wr, br, training) * g[mask]).sum().backward()
    close(x.grad[mask], xv.grad)
    close(w.grad, wr.grad)
    close(b.grad, br.grad)


def test_step_one_and_no_valid_row():
    """One valid row: variance 0, output = bias, zero input gradient, running
    variance updated with 0. No valid row: output 0, statistics untouched."""
    gen = torch.Generator().manual_seed(4)
    N, C, L, momentum = 3, 4, 2, 0.25
    rm, rv = stats(gen, L, C)
    rm0, rv0 = rm.clone(), rv.clone()
    w, b = rnd(gen, C), rnd(gen, C)
    x = rnd(gen, N, C).requires_grad_()
    one = torch.tensor([False, True, False])
    y = tnref.recurrent_batch_norm_step(x, 0, rm, rv, w, b, True, momentum, mask=one)
    close(y[1], b)
    assert (y[~one] == 0).all()
    close(rm[0], (1 - momentum) * rm0[0] + momentum * x[1].detach())
    close(rv[0], (1 - momentum) * rv0[0])
    assert torch.equal(rm[1], rm0[1]) and torch.equal(rv[1], rv0[1])
    y.sum().backward()
    assert (x.grad == 0).all()

    rm0, rv0 = rm.clone(), rv.clone()
    y = tnref.recurrent_batch_norm_step(x, 1, rm, rv, w, b, True, mask=torch.zeros(N, dtype=torch.bool))
    assert (y == 0).all()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_step_rejects_negative_t():
    rm, rv = torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
    with pytest.raises(ValueError, match="t must be >= 0"):
        tnref.recurrent_batch_norm_step(torch.ones(2, 3, dtype=D), -1, rm, rv)


@pytest.mark.parametrize("training", [True, False])
def test_step_gradcheck(training):
    gen = torch.Generator().manual_seed(5)
    N, C, L = 4, 3, 2
    rm, rv = stats(gen, L, C)
    mask = torch.tensor([True, True, False, True])
    args = tuple(v.requires_grad_() for v in (rnd(gen, N, C), rnd(gen, C), rnd(gen, C)))

    def fn(x, w, b):
        return tnref.recurrent_batch_norm_step(x, 3, rm.clone(), rv.clone(), w, b, training, mask=mask)

    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


# ---------------------------------------------------------------------------
# bn_lstm
# ---------------------------------------------------------------------------


def bn_lstm_by_hand(x, h, c, p, st, training, momentum, eps, lengths=None):
    """BN-LSTM written out step by step with F.batch_norm on each step's
    still-running sequences (which must be at least two per step in training)."""
    T, N = x.shape[:2]
    L = st["ih"][0].shape[0]
    lengths = [T] * N if lengths is None else list(lengths)
    out = torch.zeros(T, N, h.shape[1], dtype=D)
    for t in range(T):
        idx = [n for n in range(N) if t < lengths[n]]
        row = min(t, L - 1)
        xt, ht, ct = x[t, idx], h[idx], c[idx]
        (m_ih, v_ih), (m_hh, v_hh), (m_c, v_c) = st["ih"], st["hh"], st["c"]
        wx = F.batch_norm(xt @ p["w_ih"].t(), m_ih[row], v_ih[row], p["g_ih"], None, training, momentum, eps)
        wh = F.batch_norm(ht @ p["w_hh"].t(), m_hh[row], v_hh[row], p["g_hh"], None, training, momentum, eps)
        i, f, g, o = (wx + wh + p["b"]).chunk(4, 1)
        ct = torch.sigmoid(f) * ct + torch.sigmoid(i) * torch.tanh(g)
        ht = torch.sigmoid(o) * torch.tanh(
            F.batch_norm(ct, m_c[row], v_c[row], p["g_c"], p["b_c"], training, momentum, eps)
        )
        h, c, out = h.clone(), c.clone(), out.clone()
        h[idx], c[idx], out[t, idx] = ht, ct, ht
    return out, (h, c)


NAMES = ["w_ih", "w_hh", "b", "g_ih", "g_hh", "g_c", "b_c"]


def lstm_case(seed, T, N, I, H, L):
    gen = torch.Generator().manual_seed(seed)
    x = rnd(gen, T, N, I)
    h0, c0 = rnd(gen, N, H, scale=0.5), rnd(gen, N, H, scale=0.5)
    p = dict(
        w_ih=rnd(gen, 4 * H, I, scale=0.5),
        w_hh=rnd(gen, 4 * H, H, scale=0.5),
        b=rnd(gen, 4 * H, scale=0.2),
        g_ih=rnd(gen, 4 * H, scale=0.3, shift=0.5),
        g_hh=rnd(gen, 4 * H, scale=0.3, shift=0.5),
        g_c=rnd(gen, H, scale=0.3, shift=0.5),
        b_c=rnd(gen, H, scale=0.2),
    )
    st = {"ih": stats(gen, L, 4 * H), "hh": stats(gen, L, 4 * H), "c": stats(gen, L, H)}
    return x, h0, c0, p, st


def clone_stats(st):
    return {k: (m.clone(), v.clone()) for k, (m, v) in st.items()}


def run_ref(x, h0, c0, p, st, training, momentum=0.1, eps=1e-5, lengths=None):
    return tnref.bn_lstm(
        x, h0, c0, p["w_ih"], p["w_hh"], p["b"], p["g_ih"], p["g_hh"], p["g_c"], p["b_c"],
        st, training, momentum, eps, lengths,
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("L", [6, 2], ids=["max_length>=T", "max_length<T"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 5, 3, 4]], ids=["full", "lengths"])
def test_bn_lstm_against_composition(training, L, lengths):
    """Outputs, final state, gradients of everything and the running statistics
    of every step after the whole sequence, against the hand composition."""
    T, N, I, H, momentum, eps = 5, 5, 3, 4, 0.2, 1e-4
    x, h0, c0, p, st = lstm_case(6, T, N, I, H, L)
    lens = None if lengths is None else torch.tensor(lengths)
    st_ref = clone_stats(st)

    def leaves():
        return [v.clone().requires_grad_() for v in (x, h0, c0, *[p[k] for k in NAMES])]

    a, b = leaves(), leaves()
    out, (hn, cn) = run_ref(a[0], a[1], a[2], dict(zip(NAMES, a[3:])), st, training, momentum, eps, lens)
    out_e, (hn_e, cn_e) = bn_lstm_by_hand(
        b[0], b[1], b[2], dict(zip(NAMES, b[3:])), st_ref, training, momentum, eps, lengths
    )
    close(out, out_e)
    close(hn, hn_e)
    close(cn, cn_e)
    for k in st:
        close(st[k][0], st_ref[k][0])
        close(st[k][1], st_ref[k][1])
    gen = torch.Generator().manual_seed(7)
    gs = [rnd(gen, *v.shape) for v in (out, hn, cn)]
    sum((v * g).sum() for v, g in zip((out, hn, cn), gs)).backward()
    sum((v * g).sum() for v, g in zip((out_e, hn_e, cn_e), gs)).backward()
    for u, v in zip(a, b):
        close(u.grad, v.grad)


def test_bn_lstm_lengths_padding_and_final_state():
    """Padded positions: output 0, zero gradient, and their input values do not
    matter; h_n is the output at each sequence's last valid step; truncating
    the batch at a sequence's end gives that sequence's c_n; lengths all T
    equal no lengths; permuting the batch (unsorted lengths) permutes the
    results."""
    T, N, I, H = 5, 5, 3, 4
    lengths = torch.tensor([3, 5, 1, 5, 4])
    x, h0, c0, p, st = lstm_case(8, T, N, I, H, 3)
    pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # (T, N)

    xg = x.clone().requires_grad_()
    out, (hn, cn) = run_ref(xg, h0, c0, p, clone_stats(st), True, lengths=lengths)
    assert (out[pad] == 0).all()
    gen = torch.Generator().manual_seed(9)
    (out * rnd(gen, *out.shape)).sum().add((hn * cn).sum()).backward()
    assert (xg.grad[pad] == 0).all()
    assert (xg.grad[~pad] != 0).all()

    garbage = torch.where(pad.unsqueeze(2), rnd(gen, T, N, I, scale=100.0), x)
    st2 = clone_stats(st)
    out2, (hn2, cn2) = run_ref(garbage, h0, c0, p, st2, True, lengths=lengths)
    st1 = clone_stats(st)
    run_ref(x, h0, c0, p, st1, True, lengths=lengths)
    close(out2, out.detach())
    close(hn2, hn.detach())
    close(cn2, cn.detach())
    for k in st:
        close(st2[k][0], st1[k][0])
        close(st2[k][1], st1[k][1])

    close(hn, out[lengths - 1, torch.arange(N)].detach())
    for n in range(N):
        t_end = int(lengths[n])
        out_t, (hn_t, cn_t) = run_ref(x[:t_end], h0, c0, p, clone_stats(st), True, lengths=lengths.clamp(max=t_end))
        close(out_t, out[:t_end].detach())
        close(hn_t[n], hn[n].detach())
        close(cn_t[n], cn[n].detach())

    # lengths all T == no lengths (outputs, state, running statistics)
    st_a, st_b = clone_stats(st), clone_stats(st)
    ra = run_ref(x, h0, c0, p, st_a, True, lengths=torch.full((N,), T))
    rb = run_ref(x, h0, c0, p, st_b, True)
    close(ra[0], rb[0])
    close(ra[1][0], rb[1][0])
    close(ra[1][1], rb[1][1])
    for k in st:
        close(st_a[k][0], st_b[k][0])
        close(st_a[k][1], st_b[k][1])

    # unsorted lengths: a permuted batch gives permuted results
    perm = torch.tensor([2, 0, 4, 1, 3])
    rp = run_ref(x[:, perm], h0[perm], c0[perm], p, clone_stats(st), True, lengths=lengths[perm])
    close(rp[0], out[:, perm].detach())
    close(rp[1][0], hn[perm].detach())
    close(rp[1][1], cn[perm].detach())


def test_bn_lstm_length_zero_and_bad_lengths():
    T, N, I, H = 3, 3, 2, 2
    x, h0, c0, p, st = lstm_case(10, T, N, I, H, 3)
    out, (hn, cn) = run_ref(x, h0, c0, p, clone_stats(st), True, lengths=torch.tensor([3, 0, 2]))
    assert (out[:, 1] == 0).all()
    close(hn[1], h0[1])
    close(cn[1], c0[1])
    with pytest.raises(ValueError, match="lengths"):
        run_ref(x, h0, c0, p, clone_stats(st), True, lengths=torch.tensor([3, 4, 2]))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lengths", [None, [3, 2, 3], [3, 1, 2]], ids=["full", "lengths", "one-left"])
def test_bn_lstm_gradcheck(training, lengths):
    T, N, I, H = 3, 3, 2, 2
    x, h0, c0, p, st = lstm_case(11, T, N, I, H, 2)
    lens = None if lengths is None else torch.tensor(lengths)
    args = tuple(v.clone().requires_grad_() for v in (x, h0, c0, *[p[k] for k in NAMES]))

    def fn(x, h0, c0, *params):
        out, (hn, cn) = run_ref(x, h0, c0, dict(zip(NAMES, params)), clone_stats(st), training, lengths=lens)
        return out, hn, cn

    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


# ---------------------------------------------------------------------------
# sequence_batch_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_sequence_batch_norm_equals_reshape(training, batch_first, affine):
    gen = torch.Generator().manual_seed(12)
    T, N, C, momentum, eps = 4, 3, 5, 0.3, 1e-3
    x = rnd(gen, T, N, C, scale=2.0, shift=-1.0)
    rm, rv = rnd(gen, C), rnd(gen, C).abs() + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    w, b = (rnd(gen, C), rnd(gen, C)) if affine else (None, None)
    xin = x.transpose(0, 1).contiguous() if batch_first else x
    y = tnref.sequence_batch_norm(xin, rm, rv, w, b, training, momentum, eps, batch_first=batch_first)
    expected = F.batch_norm(x.reshape(T * N, C), rm_ref, rv_ref, w, b, training, momentum, eps).reshape(T, N, C)
    close(y, expected.transpose(0, 1) if batch_first else expected)
    close(rm, rm_ref)
    close(rv, rv_ref)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_batch_norm_with_lengths(training, batch_first):
    """Equals F.batch_norm over only the valid positions (gathered), padded
    outputs 0 with zero gradient, same running statistics."""
    gen = torch.Generator().manual_seed(13)
    T, N, C, momentum, eps = 5, 4, 3, 0.3, 1e-3
    lengths = torch.tensor([2, 5, 0, 3])
    x0 = rnd(gen, T, N, C, scale=2.0, shift=1.0)
    rm, rv = rnd(gen, C), rnd(gen, C).abs() + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    w, b = rnd(gen, C), rnd(gen, C)
    valid = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)  # (T, N)
    xin = (x0.transpose(0, 1) if batch_first else x0).clone().requires_grad_()
    y = tnref.sequence_batch_norm(xin, rm, rv, w, b, training, momentum, eps, lengths, batch_first)
    yt = y.transpose(0, 1) if batch_first else y
    xv = x0[valid].clone().requires_grad_()
    expected = F.batch_norm(xv, rm_ref, rv_ref, w, b, training, momentum, eps)
    close(yt[valid], expected)
    assert (yt[~valid] == 0).all()
    close(rm, rm_ref)
    close(rv, rv_ref)
    g = rnd(gen, T, N, C)
    (yt * g).sum().backward()
    (expected * g[valid]).sum().backward()
    grad = xin.grad.transpose(0, 1) if batch_first else xin.grad
    assert (grad[~valid] == 0).all()
    close(grad[valid], xv.grad)


def test_sequence_batch_norm_gradcheck():
    gen = torch.Generator().manual_seed(14)
    T, N, C = 3, 3, 2
    lengths = torch.tensor([3, 1, 2])
    args = tuple(v.requires_grad_() for v in (rnd(gen, T, N, C), rnd(gen, C), rnd(gen, C)))

    def fn(x, w, b):
        return tnref.sequence_batch_norm(x, None, None, w, b, True, lengths=lengths)

    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)

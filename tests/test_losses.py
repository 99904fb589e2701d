"""Hand-computed tests for alignment/losses.py.

Expected values come from the `math` module or from the arithmetic in each
docstring, never from the function under test.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

from alignment import estimators as E
from alignment import losses as L

LN2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def log1pexp(x):
    """-logsigmoid(x) = log(1 + e^-x), computed with math."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- DPO family

def test_dpo_sigmoid_at_init_is_ln2_and_gradient_pushes_chosen_up():
    """policy == reference gives h = 0 and loss = -log sigma(0) = ln 2, with rewards 0.
    d loss / d pi_c = -beta sigma(-beta h) = -beta/2 (negative, so a descent step raises pi_c);
    d loss / d pi_r = +beta/2."""
    beta = 0.1
    pc = t(-5.0, -7.0).requires_grad_()
    pr = t(-6.0, -3.0).requires_grad_()
    losses, cr, rr = L.dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta)
    assert torch.allclose(losses, torch.full_like(losses, LN2))
    assert torch.all(cr == 0) and torch.all(rr == 0) and torch.all(cr - rr == 0)
    assert not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    assert torch.allclose(pc.grad, torch.full((2,), -beta / 2, dtype=torch.float64))
    assert torch.allclose(pr.grad, torch.full((2,), beta / 2, dtype=torch.float64))


def test_dpo_rewards_are_beta_logratios():
    """beta=0.5, pi_c=-1, ref_c=-2 gives reward 0.5; pi_r=-4, ref_r=-3 gives -0.5.
    h = 1 - (-1) = 2, loss = log(1 + e^{-1})."""
    losses, cr, rr = L.dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-3.0), beta=0.5)
    assert cr.item() == pytest.approx(0.5)
    assert rr.item() == pytest.approx(-0.5)
    assert losses.item() == pytest.approx(log1pexp(1.0))


def test_ipo_at_init():
    """h = 0, so loss = (0 - 1/(2 beta))^2 = 1/(4 beta^2); beta 0.1 gives 25."""
    x = t(-3.0, -9.0)
    losses, _, _ = L.dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    assert torch.allclose(losses, torch.full_like(losses, 25.0))


def test_ipo_on_numbers():
    """beta=0.5, so the target is 1/(2*0.5) = 1. h = (-1 - -2) - (-4 - -3) = 2, loss (2-1)^2 = 1."""
    losses, _, _ = L.dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-3.0), beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx(1.0)


def test_cdpo_label_smoothing():
    """beta=0.5, h=2, so beta h = 1 and eps = 0.1:
    loss = -(0.9) log sigma(1) - 0.1 log sigma(-1)
         = 0.9 log(1+e^-1) + 0.1 log(1+e)
         = 0.9*0.3132617 + 0.1*1.3132617 = 0.4132617."""
    expected = 0.9 * log1pexp(1.0) + 0.1 * log1pexp(-1.0)
    assert expected == pytest.approx(0.4132617, abs=1e-7)
    losses, _, _ = L.dpo_loss(t(0.0), t(-2.0), t(0.0), t(0.0), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(expected, abs=1e-10)


def test_hinge():
    """beta=0.5: h=1 gives relu(1 - 0.5) = 0.5; h=3 gives relu(1 - 1.5) = 0; h=-2 gives relu(2) = 2."""
    z = torch.zeros(3, dtype=torch.float64)
    losses, _, _ = L.dpo_loss(t(1.0, 3.0, -2.0), z, z, z, beta=0.5, loss_type="hinge")
    assert torch.allclose(losses, t(0.5, 0.0, 2.0))


def test_dpo_rejects_unknown_type_and_misplaced_smoothing():
    x = t(0.0)
    with pytest.raises(ValueError):
        L.dpo_loss(x, x, x, x, 0.1, loss_type="nope")
    with pytest.raises(ValueError):
        L.dpo_loss(x, x, x, x, 0.1, loss_type="ipo", label_smoothing=0.1)


def test_simpo():
    """beta=2, gamma_beta_ratio=0.5, so gamma = 1.
    (c, r) = (-1, -1.5): h = 2*0.5 - 1 = 0, loss ln 2.
    (c, r) = (-0.5, -2): h = 2*1.5 - 1 = 2, loss log(1+e^-2) = 0.126928.
    rewards = beta*c = (-2, -1), beta*r = (-3, -4).
    With eps=0.2 the second pair gives 0.8 log(1+e^-2) + 0.2 log(1+e^2)."""
    c, r = t(-1.0, -0.5), t(-1.5, -2.0)
    losses, cr, rr = L.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    assert losses[0].item() == pytest.approx(LN2)
    assert losses[1].item() == pytest.approx(log1pexp(2.0))
    assert losses[1].item() == pytest.approx(0.126928, abs=1e-6)
    assert torch.allclose(cr, t(-2.0, -1.0)) and torch.allclose(rr, t(-3.0, -4.0))
    smoothed, _, _ = L.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.2)
    assert smoothed[1].item() == pytest.approx(0.8 * log1pexp(2.0) + 0.2 * log1pexp(-2.0))
    # the default gamma_beta_ratio is the SimPO paper's 0.5: the same numbers without passing it
    assert torch.allclose(L.simpo_loss(c, r, beta=2.0)[0], losses)


# ---------------------------------------------------------------- reward model

def test_bradley_terry():
    """Zero head: -log sigma(0) = ln 2.
    Margin: s_c=1, s_r=0, m=1 gives diff 0 and ln 2; s_c=2, s_r=0, m=1 gives log(1+e^-1) = 0.3132617.
    Centering: s_c=1, s_r=-0.5, coef 0.01 gives log(1+e^-1.5) + 0.01*(0.5)^2 = 0.2014133 + 0.0025."""
    z = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(L.bradley_terry_loss(z, z), torch.full_like(z, LN2))
    m = L.bradley_terry_loss(t(1.0, 2.0), t(0.0, 0.0), margin=t(1.0, 1.0))
    assert m[0].item() == pytest.approx(LN2)
    assert m[1].item() == pytest.approx(log1pexp(1.0))
    c = L.bradley_terry_loss(t(1.0), t(-0.5), center_coef=0.01)
    assert c.item() == pytest.approx(log1pexp(1.5) + 0.0025)
    assert c.item() == pytest.approx(0.2039133, abs=1e-7)


# ---------------------------------------------------------------- logprobs

def _naive_logprobs(logits, labels):
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_sequence_logprobs_matches_naive_and_respects_mask():
    """Unmasked positions must equal log_softmax(z)[label]. Masked positions
    (whose labels are -100 here) must be exactly 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    labels_ignored = labels.masked_fill(mask == 0, -100)
    out = L.sequence_logprobs(logits, labels_ignored, mask)
    ref = _naive_logprobs(logits, labels) * mask
    assert out.shape == (2, 5)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.all(out[mask == 0] == 0)
    assert torch.all(out[mask == 1] < 0)


def test_sequence_logprobs_temperature_divides_logits():
    """At temperature tau the result should be log_softmax(z / tau)[label]."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 7, generator=g)
    labels = torch.randint(0, 7, (1, 4), generator=g)
    mask = torch.ones(1, 4)
    out = L.sequence_logprobs(logits, labels, mask, temperature=0.7)
    assert torch.allclose(out, _naive_logprobs(logits / 0.7, labels), atol=1e-6)
    assert not torch.allclose(out, _naive_logprobs(logits, labels), atol=1e-3)


def test_entropy_from_logits():
    """Uniform logits over V give H = ln V. Random logits give -sum p log p."""
    assert torch.allclose(L.entropy_from_logits(torch.zeros(3, 8)), torch.full((3,), math.log(8)))
    z = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    p = torch.softmax(z, -1)
    assert torch.allclose(L.entropy_from_logits(z), -(p * p.log()).sum(-1), atol=1e-6)


# ---------------------------------------------------------------- masked stats

def test_masked_stats():
    """Values [1, 2, 3, 100] with the last one masked: mean 2, sum 6,
    unbiased var ((1)+(0)+(1))/2 = 1, biased var 2/3.
    Whitened: (x-2)/1 gives [-1, 0, 1] at the kept positions; shift_mean=False gives [1, 2, 3]."""
    x = t(1.0, 2.0, 3.0, 100.0)
    m = torch.tensor([1, 1, 1, 0])
    assert L.masked_mean(x, m).item() == pytest.approx(2.0)
    assert L.masked_sum(x, m).item() == pytest.approx(6.0)
    assert L.masked_var(x, m).item() == pytest.approx(1.0)
    assert L.masked_var(x, m, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    w = L.masked_whiten(x, m)
    assert torch.allclose(w[:3], t(-1.0, 0.0, 1.0), atol=1e-6)
    w2 = L.masked_whiten(x, m, shift_mean=False)
    assert torch.allclose(w2[:3], t(1.0, 2.0, 3.0), atol=1e-6)
    # Variance other than 1: [1, 5, 9] has mean 5 and unbiased variance (16 + 0 + 16) / 2 = 16, std 4.
    # Whitened: [-1, 0, 1]; shift_mean=False adds the mean back: [4, 5, 6].
    y = t(1.0, 5.0, 9.0, -7.0)
    assert torch.allclose(L.masked_whiten(y, m)[:3], t(-1.0, 0.0, 1.0), atol=1e-6)
    assert torch.allclose(L.masked_whiten(y, m, shift_mean=False)[:3], t(4.0, 5.0, 6.0), atol=1e-6)
    rows = L.masked_mean(torch.stack([x, x]), torch.stack([m, torch.zeros_like(m)]), dim=1)
    assert torch.allclose(rows, t(2.0, 0.0))  # an all-masked row gives 0, not NaN


def test_masked_var_bessel_factor_at_one_and_two_elements():
    """n = 2: [1, 3] has biased variance 1, unbiased 1 * 2 / 1 = 2. n = 1: the factor n / (n - 1) would
    be infinite; it is 1 and the variance 0 (finite). n = 3: [1, 2, 3] -> 2/3 * 3/2 = 1."""
    x = t(1.0, 3.0, 50.0)
    assert L.masked_var(x, torch.tensor([1, 1, 0])).item() == pytest.approx(2.0)
    assert L.masked_var(x, torch.tensor([1, 1, 0]), unbiased=False).item() == pytest.approx(1.0)
    one = L.masked_var(x, torch.tensor([0, 1, 0]))
    assert one.item() == 0.0 and torch.isfinite(one)
    assert L.masked_var(t(1.0, 2.0, 3.0), torch.ones(3)).item() == pytest.approx(1.0)


def test_last_real_index_of_rows_with_and_without_real_tokens():
    """[0, 0, 0] has no real token: -1; [1, 1, 0]: 1; [0, 1, 1] (left padding): 2; [1, 0, 1]: 2."""
    mask = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]])
    assert L.last_real_index(mask).tolist() == [-1, 1, 2, 2]


# ---------------------------------------------------------------- KL

def test_kl_estimators():
    """logp=-1, ref=-1.5, so log r = -0.5: k1 = 0.5; k2 = 0.5*0.25 = 0.125; k3 = e^-0.5 - 1 + 0.5 = 0.10653.
    Every estimator is 0 when logp == ref; the registry holds exactly these three names."""
    lp, ref = t(-1.0), t(-1.5)
    assert E.kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert E.kl_penalty(lp, ref, "k2").item() == pytest.approx(0.125)
    assert round(E.kl_penalty(lp, ref, "k3").item(), 5) == 0.10653
    assert list(E.KL) == ["k1", "k2", "k3"]
    same = t(-0.3, -2.0)
    for kind in E.KL:
        assert torch.all(E.kl_penalty(same, same, kind) == 0)
    with pytest.raises(ValueError):
        E.kl_penalty(lp, ref, "full")
    masked = E.masked_kl(t(-1.0, -1.0)[None], t(-1.5, -3.0)[None], torch.tensor([[1, 0]]), "k1")
    assert masked.tolist() == [[0.5, 0.0]]  # nothing after EOS adds KL


def _policy_and_reference():
    """A 6-outcome categorical policy p = softmax(theta) and a fixed reference."""
    theta = torch.tensor([0.3, -1.2, 0.8, 0.0, 1.5, -0.4], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([-0.5, 0.2, 1.0, -1.0, 0.4, 0.9], dtype=torch.float64), 0)
    return theta, ref


def _grad(f):
    theta, ref = _policy_and_reference()
    return torch.autograd.grad(f(torch.log_softmax(theta, 0), ref), theta)[0]


def _kl(a, b):
    return (a.exp() * (a - b)).sum()


def test_each_kl_estimator_s_expected_gradient_by_enumeration():
    """Exact expectations over the 6 outcomes x ~ p (no sampling). In the loss the tokens are fixed and
    the gradient flows through log p: E_p[grad k]. In the reward -beta k is a detached reward:
    REINFORCE's E_p[k grad log p]. What each gives, against the true gradients:
      loss   k1: 0 (refused by the schema)   k2: grad KL(p||ref)   k3: grad KL(ref||p);
      reward k1: grad KL(p||ref)   k2: grad E_p[k2] - grad KL(p||ref)   k3: grad KL(p||ref) - grad KL(ref||p)."""
    forward = _grad(lambda lp, ref: _kl(lp, ref))  # KL(policy || ref)
    reverse = _grad(lambda lp, ref: _kl(ref, lp))  # KL(ref || policy)
    mean_k2 = _grad(lambda lp, ref: (lp.exp() * E.kl_penalty(lp, ref, "k2")).sum())
    assert forward.abs().min() > 1e-3 and (forward - reverse).abs().max() > 1e-2  # the two directions differ here
    want = {"k1": (torch.zeros(6, dtype=torch.float64), forward),
            "k2": (forward, mean_k2 - forward),
            "k3": (reverse, forward - reverse)}
    for name, (in_loss, in_reward) in want.items():
        loss = _grad(lambda lp, ref: (lp.exp().detach() * E.kl_penalty(lp, ref, name)).sum())
        reward = _grad(lambda lp, ref: (lp.exp().detach() * E.kl_penalty(lp, ref, name).detach() * lp).sum())
        assert torch.allclose(loss, in_loss, atol=1e-12), name
        assert torch.allclose(reward, in_reward, atol=1e-12), name
        assert (E.KL[name].in_loss is None) == (name == "k1")  # the schema refuses exactly the zero-gradient one
    # what they estimate: k1 and k3 are unbiased for KL(p||ref); k2 is not
    theta, ref = _policy_and_reference()
    lp = torch.log_softmax(theta, 0).detach()
    value = {name: (lp.exp() * E.kl_penalty(lp, ref, name)).sum().item() for name in E.KL}
    assert value["k1"] == pytest.approx(_kl(lp, ref).item()) and value["k3"] == pytest.approx(_kl(lp, ref).item())
    assert abs(value["k2"] - _kl(lp, ref).item()) > 1e-3


# ---------------------------------------------------------------- GAE

def test_gae_gamma1():
    """gamma=1, lam=0.95, r=[0,0,1], V=[.5,.5,.5], and V=0 after the end.
    delta = [0+.5-.5, 0+.5-.5, 1+0-.5] = [0, 0, .5]
    A2 = .5; A1 = 0 + .95*.5 = .475; A0 = .95*.475 = .45125; returns = A + V."""
    mask = torch.ones(1, 3)
    A, R = L.gae(t(0.0, 0.0, 1.0)[None], t(0.5, 0.5, 0.5)[None], mask, 1.0, 0.95)
    assert torch.allclose(A, t(0.45125, 0.475, 0.5)[None])
    assert torch.allclose(R, t(0.95125, 0.975, 1.0)[None])


def test_gae_discounted():
    """gamma=.9, lam=.8 (gamma*lam = .72), r=[-.1,.2,1], V=[.3,.4,.6]:
    delta2 = 1 - .6 = .4; delta1 = .2 + .9*.6 - .4 = .34; delta0 = -.1 + .9*.4 - .3 = -.04
    A2 = .4; A1 = .34 + .72*.4 = .628; A0 = -.04 + .72*.628 = .41216."""
    A, R = L.gae(t(-0.1, 0.2, 1.0)[None], t(0.3, 0.4, 0.6)[None], torch.ones(1, 3), 0.9, 0.8)
    assert torch.allclose(A, t(0.41216, 0.628, 0.4)[None])
    assert torch.allclose(R, A + t(0.3, 0.4, 0.6)[None])


def test_gae_masking():
    """Padding after the last real token (with junk rewards/values) must leave the real
    positions as in test_gae_discounted and give 0 in the padding. Left padding must do the same."""
    r = t(-0.1, 0.2, 1.0, 5.0, 7.0)[None]
    v = t(0.3, 0.4, 0.6, 9.0, -3.0)[None]
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    A, R = L.gae(r, v, mask, 0.9, 0.8)
    assert torch.allclose(A, t(0.41216, 0.628, 0.4, 0.0, 0.0)[None])
    assert torch.allclose(R, t(0.71216, 1.028, 1.0, 0.0, 0.0)[None])
    A_left, _ = L.gae(t(3.0, -0.1, 0.2, 1.0)[None], t(2.0, 0.3, 0.4, 0.6)[None],
                      torch.tensor([[0, 1, 1, 1]]), 0.9, 0.8)
    assert torch.allclose(A_left, t(0.0, 0.41216, 0.628, 0.4)[None])


# ---------------------------------------------------------------- PPO

def test_ppo_policy_loss_on_policy():
    """With new == old, ratio = 1 and no token is clipped, so loss = -masked_mean(A),
    approxkl = 0 and clipfrac = 0. A = [1, -3, 2, (100 masked)] gives loss = -(0)/3 = 0;
    A = [1, 2, 3, (100 masked)] gives -2."""
    lp = t(-1.0, -2.0, -0.5, -3.0)[None]
    mask = torch.tensor([[1, 1, 1, 0]])
    for adv, expected in ((t(1.0, -3.0, 2.0, 100.0), 0.0), (t(1.0, 2.0, 3.0, 100.0), -2.0)):
        loss, clipfrac, kl = L.ppo_policy_loss(lp, lp, adv[None], mask, 0.2)
        assert loss.item() == pytest.approx(expected)
        assert clipfrac.item() == 0.0 and kl.item() == 0.0


def test_ppo_policy_loss_clipping():
    """eps = 0.2, ratios [1.5, 1.5, 0.5, 0.5], A [1, -1, 1, -1] (plus one masked token):
    tok0: max(-1.5, -1.2) = -1.2 (clipped)   tok1: max(1.5, 1.2) = 1.5
    tok2: max(-0.5, -0.8) = -0.5             tok3: max(0.5, 0.8) = 0.8 (clipped)
    loss = (-1.2 + 1.5 - 0.5 + 0.8)/4 = 0.15, clipfrac = 2/4,
    approxkl = 0.5 * (2 ln(1.5)^2 + 2 ln(2)^2)/4.
    Gradient w.r.t. new_logp: 0 on clipped tokens; tok2: d(-A r)/dlogp / 4 = -0.5/4."""
    old = torch.zeros(1, 5, dtype=torch.float64)
    new = torch.log(t(1.5, 1.5, 0.5, 0.5, 10.0))[None].requires_grad_()
    adv = t(1.0, -1.0, 1.0, -1.0, 50.0)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac, kl = L.ppo_policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.15)
    assert clipfrac.item() == pytest.approx(0.5)
    assert kl.item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(2.0) ** 2))
    loss.backward()
    assert torch.allclose(new.grad, t(0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0)[None])


def test_ppo_value_loss():
    """eps=0.2, v_old=0, v=[0.5, -0.1], R=[1, 1]: v_clip = [0.2, -0.1]
    (v-R)^2 = [.25, 1.21], (v_clip-R)^2 = [.64, 1.21], max = [.64, 1.21]
    loss = 0.5 * (1.85/2) = 0.4625; clipfrac = 1/2 (strictly larger only on tok0)."""
    loss, clipfrac = L.ppo_value_loss(t(0.5, -0.1)[None], torch.zeros(1, 2, dtype=torch.float64),
                                      t(1.0, 1.0)[None], torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.4625)
    assert clipfrac.item() == pytest.approx(0.5)


def test_ppo_value_loss_clips_around_the_old_values():
    """old [1, 1], new [0.9, 1.5], returns [0, 2], eps 0.2: v_clip = old + clip(new - old, -0.2, 0.2)
    = [0.9, 1.2]; (v - R)^2 = [0.81, 0.25], (v_clip - R)^2 = [0.81, 0.64]; max [0.81, 0.64];
    loss 0.5 * 1.45 / 2 = 0.3625; clipped strictly larger on the second token only: clipfrac 1/2."""
    loss, clipfrac = L.ppo_value_loss(t(0.9, 1.5)[None], t(1.0, 1.0)[None], t(0.0, 2.0)[None], torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.3625)
    assert clipfrac.item() == pytest.approx(0.5)
    per_token, clipped = L.clipped_value_error(t(0.9, 1.5)[None], t(1.0, 1.0)[None], t(0.0, 2.0)[None], 0.2)
    assert torch.allclose(per_token, t(0.405, 0.32)[None]) and clipped.tolist() == [[False, True]]


def test_clip_higher_widens_only_the_upper_side():
    """DAPO's clip-higher, eps 0.2, eps_high 0.28. A = 1, ratio e^0.5 = 1.6487: clipped at 1.28, loss
    -1.28 (-1.2 without eps_high). A = -1, ratio e^-0.5 = 0.6065: max(0.6065, 0.8) = 0.8 either way."""
    mask = torch.ones(1, 1)
    up = (t(0.5)[None], t(0.0)[None], t(1.0)[None])
    assert L.ppo_policy_loss(*up, mask, 0.2, clip_eps_high=0.28)[0].item() == pytest.approx(-1.28)
    assert L.ppo_policy_loss(*up, mask, 0.2)[0].item() == pytest.approx(-1.2)
    down = (t(-0.5)[None], t(0.0)[None], t(-1.0)[None])
    assert L.ppo_policy_loss(*down, mask, 0.2, clip_eps_high=0.28)[0].item() == pytest.approx(0.8)
    assert L.ppo_policy_loss(*down, mask, 0.2)[0].item() == pytest.approx(0.8)


def test_sequence_level_ratio_by_hand():
    """GSPO: log-ratios [0.2, -0.1, (0.5 masked)], A = 1: the reply's ratio s = exp((0.2 - 0.1) / 2)
    = e^0.05 = 1.051271 on both real tokens. Unclipped (eps 0.2) each token's loss is -s, and its
    gradient wrt each real token's log-prob -s / 2 (through the mean), 0 on the masked one. With
    GSPO's eps 3e-4 / 4e-4 the ratio clips at 1.0004: loss -1.0004, no gradient. Per token the
    first token alone (ratio e^0.2) would give -1.2214."""
    new = t(0.2, -0.1, 0.5)[None].requires_grad_()
    old, adv, mask = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64), torch.tensor([[1, 1, 0]])
    s = math.exp(0.05)
    per_token, clipped = L.clipped_surrogate(new, old, adv, mask, 0.2, level="sequence")
    assert per_token[0, :2].tolist() == pytest.approx([-s, -s]) and not clipped.any()
    loss = L.aggregate(per_token, mask, "sequence")
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([-s / 2, -s / 2, 0.0])
    tight, clipped = L.clipped_surrogate(new.detach(), old, adv, mask, 3e-4, 4e-4, level="sequence")
    assert tight[0, :2].tolist() == pytest.approx([-1.0004, -1.0004]) and clipped[0, :2].all()
    token, _ = L.clipped_surrogate(new.detach(), old, adv, mask, None)
    assert token[0, 0].item() == pytest.approx(-math.exp(0.2))


def test_loss_aggregation_over_micro_batches_and_processes_divides_by_global_totals():
    """Per-token losses [[1, 2, 3], [4, x, x], [5, 6, x]] (x masked), split into part A (rows 0-1) and
    part B (row 2), as two micro-batches or two processes. Totals: 6 tokens, 3 replies.
    token:    A (1+2+3+4)/6 = 10/6, B (5+6)/6 = 11/6, sum 21/6 = 3.5 (a mean of the parts' own means,
              (10/4 + 11/2) / 2 = 4.0, would weigh row 2's tokens more);
    sequence: A (2 + 4)/3 = 2, B 5.5/3, sum 11.5/3 = 3.8333;
    dr_grpo:  (10 + 11) / (3 replies x 3) = 21/9 = 2.3333. Each sum equals `aggregate` of the whole."""
    x = t(1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 5.0, 6.0, 9.0).view(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    want = {"token": (10 / 6, 11 / 6, 3.5), "sequence": (2.0, 5.5 / 3, 11.5 / 3), "dr_grpo": (10 / 9, 11 / 9, 21 / 9)}
    for kind, (a, b, whole) in want.items():
        part_a = L.aggregate_loss(x[:2], mask[:2], kind, total_tokens=6, total_replies=3, max_length=3)
        part_b = L.aggregate_loss(x[2:], mask[2:], kind, total_tokens=6, total_replies=3, max_length=3)
        assert (part_a.item(), part_b.item()) == (pytest.approx(a), pytest.approx(b)), kind
        assert L.aggregate(x, mask, kind, max_length=3).item() == pytest.approx(whole), kind
        assert (part_a + part_b).item() == pytest.approx(whole), kind


def test_overlong_penalty_by_hand():
    """DAPO eq. 13, max 20, cache 5: lengths 10, 15 -> 0; 16 -> (15 - 16)/5 = -0.2; 18 -> -0.6; 20 -> -1;
    cache 0: no shaping."""
    lengths = torch.tensor([10, 15, 16, 18, 20])
    assert L.overlong_penalty(lengths, 20, 5).tolist() == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0])
    assert L.overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 5


def test_informative_groups():
    """Groups of 2: [1, 1] all equal (dropped by dynamic sampling), [0, 1] not, [0.5, 0.5] equal."""
    assert L.informative_groups(t(1.0, 1.0, 0.0, 1.0, 0.5, 0.5), 2).tolist() == [False, True, False]


# ---------------------------------------------------------------- critic-free advantage estimators

def test_advantage_estimators_at_group_size_two():
    """[1, 3]: GRPO's unbiased std is sqrt(2) = 1.41421, so +-1 / (1.41421 + 1e-4); RLOO: each minus the
    other, [-2, 2]; reinforce_baseline unscaled: [-1, 1]. Group size 1: GRPO's std is 0 (advantage 0)."""
    a = E.ADVANTAGE["grpo"](t(1.0, 3.0), 2)
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert a.tolist() == pytest.approx([-expected, expected], rel=1e-6)
    assert E.ADVANTAGE["rloo"](t(1.0, 3.0), 2).tolist() == pytest.approx([-2.0, 2.0])
    assert E.ADVANTAGE["reinforce_baseline"](t(1.0, 3.0), 2, scale=False).tolist() == pytest.approx([-1.0, 1.0])
    assert E.ADVANTAGE["grpo"](t(1.0, 3.0), 1).tolist() == [0.0, 0.0]


def test_reinforce_baseline_whitens_over_the_batch_it_is_given():
    """Groups [1, 3], [0, 4]: centred [-1, 1, -2, 2]; mean 0, unbiased var (1+1+4+4)/3 = 10/3, so
    whitened x / sqrt(10/3 + 1e-8). A `whiten` callable (the loop's, over all processes) replaces that."""
    a = E.ADVANTAGE["reinforce_baseline"](t(1.0, 3.0, 0.0, 4.0), 2)
    assert a.tolist() == pytest.approx([v / math.sqrt(10 / 3) for v in (-1, 1, -2, 2)], rel=1e-6)
    assert E.ADVANTAGE["reinforce_baseline"](t(1.0, 3.0), 2, whiten=lambda x: x * 10).tolist() == [-10.0, 10.0]


def test_the_schema_takes_its_estimator_names_from_the_registries():
    from alignment import config

    assert config.KL_ESTIMATORS == tuple(E.KL) and config.ADVANTAGE_ESTIMATORS == tuple(E.ADVANTAGE)
    assert set(config.ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce_baseline"}
    assert config.GRPOOptions(kl_estimator="k2").kl_estimator == "k2"


def test_adaptive_kl_update():
    """err = clip(12/6 - 1, -.2, .2) = .2; beta = 0.15 * (1 + .2*512/10000) = 0.15 * 1.01024 = 0.151536.
    KL 3 (err = -0.5, clipped to -0.2) gives 0.15 * (1 - 0.01024) = 0.148464."""
    assert L.adaptive_kl_update(0.15, 12.0, 6.0, 512, 10000) == pytest.approx(0.151536)
    assert L.adaptive_kl_update(0.15, torch.tensor(3.0), 6.0, 512, 10000) == pytest.approx(0.148464)


# ---------------------------------------------------------------- hygiene

def test_losses_imports_only_torch():
    """The module may import only torch, torch.nn.functional and typing, with no relative imports."""
    src = Path(__file__).resolve().parents[1] / "alignment" / "losses.py"
    tree = ast.parse(src.read_text())
    allowed = {"torch", "torch.nn.functional", "typing"}
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            seen.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            seen.add(node.module)
    assert seen and seen <= allowed, seen


def test_estimators_import_nothing():
    """The schema reads the registries' names before torch loads: estimators.py imports only typing."""
    src = Path(__file__).resolve().parents[1] / "alignment" / "estimators.py"
    seen = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            seen.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            seen.add(node.module)
    assert seen == {"typing"}, seen


# ------------------------------------------- gaps a mutation run of losses.py found (mutmut)

def test_clipped_value_error_clips_a_fall_as_well_as_a_rise():
    """v_old = 1, v = 0, R = 0, eps = 0.2: v - v_old = -1 clips to -0.2, v_clip = 0.8;
    (v - R)^2 = 0, (v_clip - R)^2 = 0.64, so the loss is 0.5 * 0.64 = 0.32 and the clip binds.
    Without the lower bound v_clip would be 0 and the loss 0."""
    per_token, clipped = L.clipped_value_error(t(0.0), t(1.0), t(0.0), 0.2)
    assert per_token.item() == pytest.approx(0.32)
    assert clipped.tolist() == [True]


def test_rewards_from_kl_adds_the_score_to_the_last_tokens_penalty():
    """kl = [0.5, 1.0, 7.0], mask [1, 1, 0], score 2, beta 0.1: r = [-0.05, -0.1 + 2, -0.7] =
    [-0.05, 1.9, -0.7] (the score is added to the last real token's -beta kl, not put in its place)."""
    r = L.rewards_from_kl(t(0.5, 1.0, 7.0).view(1, 3), torch.tensor([[1, 1, 0]]), t(2.0), 0.1)
    assert r.tolist()[0] == pytest.approx([-0.05, 1.9, -0.7])


def test_dr_grpo_divides_by_the_length_limit_not_the_batch_width():
    """l = [[1, 2, 0]], m = [[1, 1, 0]], B = 1. Dr. GRPO with max_length 4: (1 + 2) / (1 * 4) = 0.75;
    with no max_length the batch width 3 is used: 3 / 3 = 1. Through aggregate, aggregate_loss
    and ppo_policy_loss (new = old so ratio 1 and l = -A: A = [-1, -2, 0])."""
    per_token, mask = t(1.0, 2.0, 0.0).view(1, 3), torch.tensor([[1, 1, 0]])
    assert L.aggregate(per_token, mask, "dr_grpo", max_length=4).item() == pytest.approx(0.75)
    assert L.aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(1.0)
    assert L.aggregate_loss(per_token, mask, "dr_grpo", 2, 1, 4).item() == pytest.approx(0.75)
    assert L.aggregate_loss(per_token, mask, "dr_grpo", 2, 1).item() == pytest.approx(1.0)
    logp = torch.zeros(1, 3, dtype=torch.float64)
    loss, _, _ = L.ppo_policy_loss(logp, logp, -per_token, mask, 0.2, aggregation="dr_grpo", max_length=4)
    assert loss.item() == pytest.approx(0.75)


def test_ppo_policy_loss_passes_the_mask_and_gspos_sequence_level_on():
    """new - old = [0.2, 0.4, 9.0], m = [1, 1, 0], A = 1, no clipping. Sequence level: the reply's
    mean log-ratio over its real tokens is 0.3, ratio e^0.3 on each token, token-mean loss -e^0.3.
    (Token level would give -(e^0.2 + e^0.4) / 2; the padded 9.0 must not enter the mean.)"""
    new = t(0.2, 0.4, 9.0).view(1, 3)
    old = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.ones(1, 3, dtype=torch.float64)
    loss, _, _ = L.ppo_policy_loss(new, old, adv, mask, None, level="sequence")
    assert loss.item() == pytest.approx(-math.exp(0.3))
    loss_tok, _, _ = L.ppo_policy_loss(new, old, adv, mask, None)
    assert loss_tok.item() == pytest.approx(-(math.exp(0.2) + math.exp(0.4)) / 2)


def test_unclipped_surrogate_says_nothing_was_clipped_as_a_bool_mask():
    """clip_eps None: loss -A ratio, and the clipped mask is all False, a bool tensor like the
    clipped branch's `pg2 > pg1` (callers index and negate it)."""
    per_token, clipped = L.clipped_surrogate(t(0.0, 0.0).view(1, 2), t(0.0, 0.0).view(1, 2),
                                             t(1.0, -2.0).view(1, 2), torch.ones(1, 2), None)
    assert per_token.tolist() == [[-1.0, 2.0]]
    assert clipped.dtype == torch.bool and not clipped.any()


def test_overlong_penalty_boundaries():
    """max_length 4. cache 0: no shaping at all, even past the limit: [0, 0] for lengths [3, 5].
    cache 1: start 3; lengths [3, 4, 5] give [0, (3 - 4) / 1 = -1, -1]. cache 2: start 2; length 3
    gives (2 - 3) / 2 = -0.5, length 6 gives (2 - 6) / 2 = -2, floored at -1."""
    assert L.overlong_penalty(torch.tensor([3, 5]), 4, 0).tolist() == [0.0, 0.0]
    assert L.overlong_penalty(torch.tensor([3, 4, 5]), 4, 1).tolist() == [0.0, -1.0, -1.0]
    assert L.overlong_penalty(torch.tensor([2, 3, 6]), 4, 2).tolist() == [0.0, -0.5, -1.0]


def test_explained_variance_with_returns_of_small_variance():
    """R = [0, 0.2], V = [0, 0.1]. Unbiased var(R): mean 0.1, squared deviations 0.01 each, mean
    0.01, times n / (n - 1) = 2: 0.02. R - V = [0, 0.1]: mean 0.05, 0.0025 each, times 2: 0.005.
    EV = 1 - 0.005 / 0.02 = 0.75 (the 1e-8 guard must not act on a variance below 1)."""
    ev = L.explained_variance(t(0.0, 0.1), t(0.0, 0.2), torch.ones(2))
    assert ev.item() == pytest.approx(0.75)


def test_masked_whiten_of_a_constant_is_zero_not_nan():
    """x = [3, 3, 3]: mean 3, var 0, (x - 3) / sqrt(0 + 1e-8) = 0; shift_mean False adds 3 back."""
    x, mask = t(3.0, 3.0, 3.0), torch.ones(3)
    assert L.masked_whiten(x, mask).tolist() == [0.0, 0.0, 0.0]
    assert L.masked_whiten(x, mask, shift_mean=False).tolist() == [3.0, 3.0, 3.0]


def test_sequence_logprobs_at_temperature_two():
    """logits [0, 2], label 1, temperature 2: z = [0, 1], log p = 1 - log(1 + e)."""
    logp = L.sequence_logprobs(torch.tensor([[[0.0, 2.0]]]), torch.tensor([[1]]), torch.ones(1, 1), 2.0)
    assert logp.item() == pytest.approx(1.0 - math.log1p(math.e), abs=1e-6)


def test_aggregate_defaults_to_the_token_mean():
    """l = [[1, 2], [3, 0]], m = [[1, 1], [1, 0]]: token mean (1 + 2 + 3) / 3 = 2
    (the sequence mean would be (1.5 + 3) / 2 = 2.25)."""
    assert L.aggregate(t(1.0, 2.0, 3.0, 0.0).view(2, 2), torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)


def test_unknown_names_are_refused_naming_what_was_given():
    """Each ValueError quotes the bad value and the accepted ones."""
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"'mean'.*'token', 'sequence' or 'dr_grpo'"):
        L.aggregate_loss(x, torch.ones(1, 2), "mean", 2, 1)
    with pytest.raises(ValueError, match=r"'tokens'.*'token' or 'sequence'"):
        L.clipped_surrogate(x, x, x, torch.ones(1, 2), 0.2, level="tokens")
    with pytest.raises(ValueError, match=r"label_smoothing.*'ipo'"):
        L.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"'bogus'.*'sigmoid', 'ipo' or 'hinge'"):
        L.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="bogus")


def test_last_real_index_stays_on_the_masks_device():
    """The positions are made on the mask's device: with a mask on the meta device (a stand-in for
    a GPU on a CPU-only machine) a CPU arange would raise a device mismatch in torch.where."""
    mask = torch.ones(2, 3, dtype=torch.long, device="meta")
    assert L.last_real_index(mask).device.type == "meta"
    assert L.last_real_index(torch.tensor([[1, 1, 0], [0, 0, 0]])).tolist() == [1, -1]


def test_estimator_registries_hold_what_was_registered_and_refuse_a_name_twice():
    """Each KL entry keeps its function and the three descriptions the schema's help and refusals
    read; registering an existing name is refused naming it, and leaves the entry as it was."""
    assert E.KL["k1"] == (E.kl_k1, "KL(policy || ref), unbiased, can be negative per token", None,
                          "the gradient of KL(policy || ref)")
    assert E.KL["k3"].fn is E.kl_k3 and E.KL["k3"].in_loss == "the gradient of KL(ref || policy), the other direction"
    with pytest.raises(ValueError, match=r"KL estimator 'k1' is registered twice"):
        E.register_kl("k1", "x", None, "y")(lambda logr: logr)
    assert E.KL["k1"].fn is E.kl_k1
    with pytest.raises(ValueError, match=r"advantage estimator 'grpo' is registered twice"):
        E.register_advantage("grpo")(lambda *a: None)
    assert E.ADVANTAGE["grpo"] is E.grpo_advantages


def test_kl_penalty_defaults_to_k1_and_masked_kl_passes_its_kind_on():
    """logp -1.0, ref -1.5 (PPO.md's check): k1 = 0.5, k2 = 0.25 / 2 = 0.125; masked tokens 0.
    An unknown name is refused listing the known ones."""
    logp, ref = t(-1.0, -1.0), t(-1.5, -1.5)
    mask = torch.tensor([1, 0])
    assert E.kl_penalty(logp, ref).tolist() == [0.5, 0.5]
    assert E.masked_kl(logp, ref, mask).tolist() == [0.5, 0.0]
    assert E.masked_kl(logp, ref, mask, "k2").tolist() == [0.125, 0.0]
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; expected one of k1, k2, k3"):
        E.kl_penalty(logp, ref, "k4")

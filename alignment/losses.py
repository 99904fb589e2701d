"""Loss functions for preference optimisation, reward modelling and online RL (PPO and the
critic-free updates; their advantage and KL estimators are registries in estimators.py).

Every function is pure: tensors in, tensors out, no module state. Shapes use
B = batch, T = sequence length, V = vocabulary. Masks are 1 for real tokens
and 0 for padding or prompt tokens; they can be bool, int or float.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Number = Union[float, torch.Tensor]


# --------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum_i x_i * m_i over `dim` (over all elements if dim is None)."""
    prod = x * mask.to(x.dtype)
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum_i x_i m_i / sum_i m_i.

    The denominator is clamped to 1e-8, so a row whose mask is all zero
    gives 0 rather than NaN.
    """
    m = mask.to(x.dtype)
    denom = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / denom.clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all masked elements: mean_m((x - mean_m(x))^2).

    With `unbiased` the Bessel factor n / (n - 1) is applied, where n = sum(m).
    If n <= 1 the factor is 1, so the result is 0 instead of inf/NaN.
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = var * torch.where(n > 1, n / (n - 1).clamp_min(1e-8), torch.ones_like(n))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mu) / sqrt(var + 1e-8), with mu and var taken over the masked elements.

    If shift_mean is False, mu is added back, so only the scale changes
    (the original mean is kept). Masked-out positions are transformed too
    but have no effect on the statistics; callers should ignore them.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# --------------------------------------------------------------------------
# Token log-probabilities
# --------------------------------------------------------------------------

def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log pi(y_t | y_<t) = z[y_t] - logsumexp(z), where z = logits / temperature.

    `logits` [B,T,V] must already line up with `labels` [B,T] (the caller
    shifts them). The work is done in float32 and uses a gather plus a
    logsumexp, so the full [B,T,V] log_softmax is never built. Labels at
    masked positions can be anything, even -100, and the output there is 0.
    Returns [B,T]; sum over T for sequence log-probs, or take masked_mean for
    the length-normalised ones.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    keep = mask.bool()
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    picked = torch.gather(z, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(z, dim=-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim, worked out in float32.

    H = -sum_v p_v log p_v = -sum_v p_v (z_v - lse) = lse - sum_v p_v z_v.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


# --------------------------------------------------------------------------
# Preference optimisation (DPO family)
# --------------------------------------------------------------------------

def _smoothed_logsigmoid_loss(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(x) - eps log sigma(-x): BCE on a label flipped with prob eps."""
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses.

    Let h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the chosen and
    rejected log-ratios (the implicit reward margin divided by beta).

    * "sigmoid" (DPO, Rafailov et al. 2023): -log sigma(beta h). Under the
      Bradley-Terry model with reward r = beta log(pi/ref), this is the negative
      log-likelihood of the preference. With label_smoothing eps it becomes
      conservative DPO (cDPO): -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    * "ipo" (Azar et al. 2023): (h - 1/(2 beta))^2, a regression of h onto
      the target 1/(2 beta). The IPO paper builds h from per-token *average*
      log-probs. Here h uses whatever log-probs the caller passes (summed or
      averaged), and picking the right ones is the caller's job.
    * "hinge" (SLiC, Zhao et al. 2023): relu(1 - beta h).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]). The rewards
    are beta (pi - ref), detached. label_smoothing only applies to "sigmoid".
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', got {loss_type!r}")
    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): reference-free and length-normalised.

    Inputs are per-token average log-probs, so the implicit reward is
    r = beta * avg log pi(y|x). With the target margin gamma = gamma_beta_ratio * beta:
        h = beta (c - r) - gamma,   loss = -log sigma(h),
    or the cDPO-style label-smoothed form when label_smoothing > 0.
    Returns (losses [B], beta*c detached, beta*r detached).
    """
    gamma = gamma_beta_ratio * beta
    h = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    losses = _smoothed_logsigmoid_loss(h, label_smoothing)
    return losses, (beta * policy_chosen_avg_logps).detach(), (beta * policy_rejected_avg_logps).detach()


# --------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------

def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood.

    P(c > r) = sigma(s_c - s_r - m), so loss = -log sigma(s_c - s_r - m)
    + center_coef * (s_c + s_r)^2. The second term pushes rewards to be
    centred around 0 (it appears as "center_rewards_coefficient" in the literature,
    cf. Eisenstein et al. 2023). m (margin) defaults to 0. Returns the same
    shape as the scores. The caller takes the mean.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_scores + rejected_scores) ** 2
    return losses


# --------------------------------------------------------------------------
# PPO helpers
# --------------------------------------------------------------------------

def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over [B,T] tokens.

    For real tokens t, with t' the next real token (and V(t') = 0 after the last one):
        delta_t = r_t + gamma V(t') - V(t),   A_t = delta_t + gamma lam A_{t'}.
    Masked positions are skipped (the recursion carries on past them), so
    padding on either side, or in the middle, leaves the real positions as they
    were. Returns (advantages, returns = advantages + values), both detached
    and both 0 at masked positions.
    """
    rewards, values = rewards.detach(), values.detach()
    keep = mask.bool()
    B, T = rewards.shape
    next_value = values.new_zeros(B)
    next_adv = values.new_zeros(B)
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        m = keep[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))
    return advantages, returns


def clipped_surrogate(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: Optional[float],
    clip_eps_high: Optional[float] = None,
    level: str = "token",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss (Schulman et al. 2017) and where the clip binds.

    log_ratio = new - old per token ("token"), or with level "sequence" (GSPO, Zheng et al. 2025,
    arXiv 2507.18071's sequence-level importance ratio) each reply's mean log-ratio over its real
    tokens, s_i = exp(mean_t (new - old)), put on every token of the reply (gradient through the mean);
    loss_t = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps_high)), eps_high = eps unless given (DAPO's
    clip-higher, Yu et al. 2025, arXiv 2503.14476). clip_eps None: no clipping, -A ratio.
    Returns (per-token loss [B,T], clipped [B,T]: the clipped branch strictly larger), unmasked.
    """
    log_ratio = new_logp - old_logp
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1).unsqueeze(1).expand_as(new_logp)
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    if clip_eps is None:
        return pg1, torch.zeros_like(pg1, dtype=torch.bool)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    return torch.maximum(pg1, pg2), pg2 > pg1


def ppo_policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: Optional[float],
    aggregation: str = "token",
    max_length: Optional[int] = None,
    clip_eps_high: Optional[float] = None,
    level: str = "token",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, as a loss to minimise: aggregate(clipped_surrogate(...)), by default the
    token mean, the negation of the pessimistic min(...) objective. clip_eps None: the plain policy
    gradient surrogate -A ratio (its gradient at ratio 1 is -A grad log pi).
    clipfrac = fraction of tokens where the clipped branch wins (strictly).
    approxkl = 0.5 masked_mean((new - old)^2), the k2 estimate of KL(old || new), per token.
    clipfrac and approxkl are detached token means.
    """
    per_token, clipped = clipped_surrogate(new_logp, old_logp, advantages, mask, clip_eps, clip_eps_high, level)
    loss = aggregate(per_token, mask, aggregation, max_length)
    clipfrac = masked_mean(clipped.to(per_token.dtype), mask).detach()
    approxkl = (0.5 * masked_mean((new_logp - old_logp) ** 2, mask)).detach()
    return loss, clipfrac, approxkl


def clipped_value_error(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss: v_clip = v_old + clip(v - v_old, -eps, eps),
    0.5 max((v - R)^2, (v_clip - R)^2). Returns (per-token loss, clipped: the clipped term strictly larger)."""
    v_clip = old_values + torch.clamp(new_values - old_values, -clip_eps, clip_eps)
    l1 = (new_values - returns) ** 2
    l2 = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), l2 > l1


def ppo_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: masked_mean of clipped_value_error.
    clipfrac = fraction of tokens where the clipped term is strictly larger (detached).
    """
    per_token, clipped = clipped_value_error(new_values, old_values, returns, clip_eps)
    loss = masked_mean(per_token, mask)
    clipfrac = masked_mean(clipped.to(per_token.dtype), mask).detach()
    return loss, clipfrac


def adaptive_kl_update(beta: float, kl_mean: Number, target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019).

    err = clip(KL / target - 1, -0.2, 0.2);   beta <- beta (1 + err * n_steps / horizon).
    Returns a Python float.
    """
    kl = float(kl_mean)
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return float(beta) * (1.0 + err * n_steps / horizon)


def rewards_from_kl(kl: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """[B,T] per-token rewards r_t = -beta kl_t, plus scores[b] on row b's last real token."""
    rewards = -beta * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_real_index(mask)] += scores.to(rewards.dtype)
    return rewards


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """[B]: the position of each row's last 1 in a [B,T] mask (-1 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - var(R - V) / var(R) over the masked elements: 1 for a perfect critic, 0 for one
    that predicts the mean, negative for worse."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp_min(1e-8)


# --------------------------------------------------------------------------
# Critic-free updates: loss aggregation, DAPO's shaping and filters
# (the advantage and KL estimators are registries in alignment/estimators.py)
# --------------------------------------------------------------------------

def aggregate(per_token: torch.Tensor, mask: torch.Tensor, kind: str = "token", max_length: Optional[int] = None) -> torch.Tensor:
    """Reduce a [B,T] per-token loss to a scalar, the ways GRPO's variants do:

    * "token"    sum_bt l m / sum_bt m: every token weighs the same (DAPO; PPO's token mean);
    * "sequence" mean_b (sum_t l m / sum_t m): every reply weighs the same, long replies' tokens
                 less (the GRPO paper);
    * "dr_grpo"  sum_bt l m / (B * max_length): a constant normaliser, no length bias (Dr. GRPO).
    Rows whose mask is all zero add 0. The same as `aggregate_loss` with this batch as the whole.
    """
    tokens = mask.to(per_token.dtype).sum().clamp_min(1e-8)
    return aggregate_loss(per_token, mask, kind, tokens, per_token.shape[0], max_length)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    total_tokens: Number,
    total_replies: Number,
    max_length: Optional[int] = None,
) -> torch.Tensor:
    """One micro-batch's part of a loss aggregated over a whole minibatch that is split into
    micro-batches (gradient accumulation) and processes: summed over every part, it is `aggregate`
    over the whole minibatch. Normalisers are the minibatch's global totals, never a part's own
    (a mean of per-part means weighs a short part's tokens more; OpenRLHF's aggregate_loss, PPO.md):

    * "token"    sum_bt l m / total_tokens;
    * "sequence" sum_b (sum_t l m / sum_t m) / total_replies;
    * "dr_grpo"  sum_bt l m / (total_replies * max_length).
    total_tokens: the real tokens of the whole minibatch (all parts); total_replies: its replies.
    Under DDP, which averages gradients over processes, the caller multiplies by the process count.
    """
    m = mask.to(per_token.dtype)
    if kind == "token":
        return masked_sum(per_token, m) / total_tokens
    if kind == "sequence":
        return masked_mean(per_token, m, dim=1).sum() / total_replies
    if kind == "dr_grpo":
        width = max_length if max_length is not None else per_token.shape[1]
        return masked_sum(per_token, m) / (total_replies * width)
    raise ValueError(f"unknown loss aggregation {kind!r}; expected 'token', 'sequence' or 'dr_grpo'")


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), per reply:
    0 up to max_length - cache tokens, then falling linearly to -1 at max_length:
    ((max_length - cache) - |y|) / cache, and -1 beyond max_length. cache 0: no shaping (all 0).
    `lengths` [B]: each reply's tokens (its EOS included). Returns [B] floats."""
    lengths = lengths.float()
    if cache <= 0:
        return torch.zeros_like(lengths)
    start = max_length - cache
    return torch.where(lengths <= start, torch.zeros_like(lengths), ((start - lengths) / cache).clamp_min(-1.0))


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / G] bool: the groups whose scores are not all equal (DAPO's dynamic sampling keeps only
    these: an all-equal group has advantage 0 under every group baseline and teaches nothing)."""
    g = scores.view(-1, group_size)
    return g.max(dim=1).values > g.min(dim=1).values

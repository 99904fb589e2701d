"""The RL loop's estimators, as registries of pure functions (verl's `register_adv_est`): a name
maps to a function, and the recipe schema's allowed names are built from these registries, so a
new estimator is one decorated function here and nothing more.

- `ADVANTAGE`: the critic-free advantage estimators (grpo, rloo, reinforce_baseline), one signature:
      fn(scores, group_size, scale, whiten) -> advantages
  `scores` [N] holds N / G groups of G consecutive replies to one prompt; `scale` lets the estimator
  rescale (GRPO's group std, REINFORCE++'s batch whitening); `whiten(x)` whitens [N] over the whole
  batch, every process's rows included (the loop passes one that gathers). Returns [N]. PPO's `gae`
  needs a critic's values and per-token rewards, so it is `losses.gae` and not in this registry. A
  recipe may also name a function of its own with this signature, 'file.py:name' (stages/rl.py loads
  it and checks what it returns).
- `KL`: per-token estimators of KL(policy || reference) from tokens sampled from the policy, with
  what each one's expected gradient follows in the loss and in the reward (the schema refuses a
  KL in the loss whose expected gradient is 0).

The module imports nothing: the functions use tensor methods only, so the schema (which must
answer before torch loads) can read the names. Shapes and masks as in `losses.py`.
"""

from typing import Callable, Dict, NamedTuple, Optional

ADVANTAGE: Dict[str, Callable] = {}
ADVANTAGE_ARGUMENTS = ("scores", "group_size", "scale", "whiten")  # what the loop passes, in this order
GRPO_EPS = 1e-4  # added to the group std (TRL's GRPOTrainer adds 1e-4 too)


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn(scores, group_size, scale, whiten) -> [N]` under `name`."""

    def add(fn: Callable) -> Callable:
        if name in ADVANTAGE:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE[name] = fn
        return fn

    return add


def _groups(scores, group_size: int):
    """[N] -> [N / G, G]: rows i*G .. i*G + G - 1 are the replies to one prompt."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"expected [N] scores with N a multiple of the group size {group_size}, got {tuple(scores.shape)}")
    return scores.float().view(-1, group_size)


@register_advantage("grpo")
def grpo_advantages(scores, group_size: int, scale: bool = True, whiten: Optional[Callable] = None):
    """GRPO (Shao et al. 2024, DeepSeekMath): each reply's score against its group's.

    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4) with `scale`, else r_i - mean_group(r)
    (Dr. GRPO, Liu et al. 2025, drops the std: it up-weights groups whose scores barely differ).
    std is the unbiased one (n - 1), as TRL's GRPOTrainer takes it; a group of one has std 0. A group
    whose scores are all equal gets advantage 0 (no NaN). `whiten` is not used.
    """
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else g[:, :1] * 0.0
        centred = centred / (std + GRPO_EPS)
    return centred.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(scores, group_size: int, scale: bool = True, whiten: Optional[Callable] = None):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each reply's score minus the mean of the
    other G - 1 replies to the same prompt (the leave-one-out baseline):

    A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) (r_i - mean_group(r)).
    Needs G >= 2. `scale` and `whiten` are not used (RLOO does not rescale).
    """
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 replies per prompt")
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@register_advantage("reinforce_baseline")
def reinforce_baseline_advantages(scores, group_size: int, scale: bool = True, whiten: Optional[Callable] = None):
    """REINFORCE++-baseline (as in OpenRLHF): A_i = r_i - mean_group(r), then, with `scale`,
    whitened over the whole batch by `whiten` (None: over `scores` itself)."""
    centred = grpo_advantages(scores, group_size, scale=False)
    if not scale:
        return centred
    if whiten is not None:
        return whiten(centred)
    return (centred - centred.mean()) / (centred.var() + 1e-8).sqrt()


# --------------------------------------------------------------------------- KL estimators


class KLEstimator(NamedTuple):
    """A per-token estimator k(log r) of KL(pi || ref), log r = ref_logp - logp, on tokens drawn from pi.

    `in_loss`: what the expected gradient of E_pi[k] follows when k is a loss term (the gradient flows
    through logp, the tokens held fixed); None: it is 0 in expectation (the term pulls nothing).
    `in_reward`: what the expected gradient follows when -k is added to the reward (REINFORCE: k is
    detached and multiplies grad log pi)."""

    fn: Callable
    estimates: str
    in_loss: Optional[str]
    in_reward: str


KL: Dict[str, KLEstimator] = {}


def register_kl(name: str, estimates: str, in_loss: Optional[str], in_reward: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        if name in KL:
            raise ValueError(f"KL estimator {name!r} is registered twice")
        KL[name] = KLEstimator(fn, estimates, in_loss, in_reward)
        return fn

    return add


# The gradients below are exact expectations over tokens x ~ p (tests/test_losses.py checks each one by
# enumerating a 6-outcome categorical policy), with d = log p(x) - log ref(x) = -log r:
#   loss:   E_p[grad k(x)];  k1: E_p[grad log p] = 0;  k2: E_p[d grad log p] = grad KL(p||ref);
#           k3: E_p[(1 - r) grad log p] = -sum_x ref(x) grad log p(x) = grad KL(ref||p).
#   reward: E_p[k(x) grad log p(x)];  k1: grad KL(p||ref);  k2: grad E_p[d^2/2] - grad KL(p||ref);
#           k3: grad KL(p||ref) - grad KL(ref||p).


@register_kl(
    "k1",
    estimates="KL(policy || ref), unbiased, can be negative per token",
    in_loss=None,
    in_reward="the gradient of KL(policy || ref)",
)
def kl_k1(logr):
    """k1 = -log r = logp - ref_logp."""
    return -logr


@register_kl(
    "k2",
    estimates="KL(policy || ref) with a bias (second order in log r), always >= 0, low variance",
    in_loss="the gradient of KL(policy || ref)",
    in_reward="the gradient of E[k2] minus that of KL(policy || ref): no KL's; small near the reference",
)
def kl_k2(logr):
    """k2 = (log r)^2 / 2."""
    return 0.5 * logr**2


@register_kl(
    "k3",
    estimates="KL(policy || ref), unbiased, always >= 0 (Schulman's k3)",
    in_loss="the gradient of KL(ref || policy), the other direction",
    in_reward="the gradient of KL(policy || ref) minus that of KL(ref || policy): no KL's; small near the reference",
)
def kl_k3(logr):
    """k3 = r - 1 - log r."""
    return logr.expm1() - logr


def kl_penalty(logp, ref_logp, kind: str = "k1"):
    """The per-token estimate `kind` (a name in KL) from log-probs of sampled tokens: k(ref_logp - logp).
    PPO.md's check: logp -1.0, ref -1.5 gives k1 0.5, k2 0.125, k3 0.10653; all 0 when equal."""
    if kind not in KL:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL)}")
    return KL[kind].fn(ref_logp - logp)


def masked_kl(logp, ref_logp, mask, kind: str = "k1"):
    """[B,T] kl_penalty on real tokens, 0 on masked ones (nothing after EOS adds KL)."""
    return kl_penalty(logp, ref_logp, kind).masked_fill(~mask.bool(), 0.0)

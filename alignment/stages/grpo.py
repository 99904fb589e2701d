"""Stage `grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

The RL loop of `stages/rl.py` with no critic: `num_generations` replies to each prompt, each
reply's advantage its score against its group's (mean, and std with `scale_rewards`), the
per-token clipped surrogate, and the KL to the reference (k3) in the loss with `beta` (0: no
reference at all). The `grpo:` section of the recipe holds the defaults (alignment/config.py,
GRPOOptions); rewards come from a reward model, Python functions or the demo oracle
(alignment/rewards.py).
"""

from .rl import run  # noqa: F401 - the one RL loop

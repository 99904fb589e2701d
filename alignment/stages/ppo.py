"""Stage `ppo`: PPO with a KL penalty and a critic (PPO.md's spec).

The one RL loop of `stages/rl.py` with GAE over a critic's values: one reply to each prompt,
per-token rewards (the KL penalty on every token, the score on the last), the clipped surrogate
and the clipped value loss. The `ppo:` section of the recipe holds the defaults (alignment/config.py,
PPOOptions).
"""

from .rl import run  # noqa: F401 - the one RL loop

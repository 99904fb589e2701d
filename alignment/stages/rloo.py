"""Stage `rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to basics").

The RL loop of `stages/rl.py` with no critic: k = `num_generations` replies to each prompt,
each reply's advantage its score minus the mean score of the other k - 1, the KL to the
reference subtracted from the score (KL in the reward, as in the paper), and a clipped or plain
(`epsilon: null`) policy gradient. The `rloo:` section of the recipe holds the defaults
(alignment/config.py, RLOOOptions).
"""

from .rl import run  # noqa: F401 - the one RL loop

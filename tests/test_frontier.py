"""The frontier's statistics: paired differences on the same prompts, the over-optimisation
test (hand-computed cases, then a simulation of whole sweeps: its false-alarm rate with no true
gold drop and its power against a true drop of 0.05 at 300 prompts x 2 samples), and which
points of the Pareto front stay there beyond their intervals."""

from __future__ import annotations

import numpy as np
import pytest

from alignment.frontier import front_beyond_ci, overoptimisation, overoptimised, paired_differences

Z95 = 1.959964  # two-sided 95%, one pair
Z95_3 = 2.393980  # two-sided 95% over 3 pairs (Bonferroni: 1 - 0.05 / 6)


def test_paired_differences_by_hand():
    # two points, four prompts: x1 - x0 = (-0.1, -0.3, -0.1, -0.1): mean -0.15, sd 0.1, se 0.05
    x = [[0.8, 0.6, 0.9, 0.7], [0.7, 0.3, 0.8, 0.6]]
    mean, lo, hi = paired_differences(x)
    assert mean[0, 1] == pytest.approx(-0.15) and mean[1, 0] == pytest.approx(0.15) and mean[0, 0] == 0
    assert lo[0, 1] == pytest.approx(-0.15 - Z95 * 0.05, abs=1e-6) and hi[0, 1] == pytest.approx(-0.15 + Z95 * 0.05, abs=1e-6)
    # a third point: three pairs, each interval widened so that the three hold together
    x3 = [*x, [0.8, 0.6, 0.9, 0.7]]
    _, lo3, hi3 = paired_differences(x3)
    assert hi3[0, 1] == pytest.approx(-0.15 + Z95_3 * 0.05, abs=1e-6)
    _, _, alone = paired_differences(x3, simultaneous=False)
    assert alone[0, 1] == pytest.approx(hi[0, 1], abs=1e-9)
    # leading axes are independent sets, each computed as on its own
    stacked = paired_differences(np.stack([np.asarray(x3), np.asarray(x3)[::-1]]))
    assert np.allclose(stacked[2][0], hi3) and np.allclose(stacked[2][1], paired_differences(np.asarray(x3)[::-1])[2])


def rows(*points):
    return [{"label": label, "kl_mean": kl, "reward_mean": reward} for label, kl, reward in points]


def test_overoptimisation_by_hand():
    a = np.array([0.8, 0.6, 0.9, 0.7])
    b = a + 0.1  # b - a = +0.1 on every prompt
    c = b + np.array([-0.1, -0.3, -0.1, -0.1])  # c - b: mean -0.15, se 0.05; c - a = (0, -0.2, 0, 0): mean -0.05, se 0.05
    gold = {"a": a, "b": b, "c": c}
    points = rows(("c", 3.0, 3.0), ("a", 0.1, 1.0), ("b", 1.0, 2.0))  # sorted by KL inside
    found = overoptimisation(points, gold)
    assert found["pairs"] == 3 and len(found["past"]) == 1
    past = found["past"][0]
    assert past["point"]["label"] == "c" and past["from"]["label"] == "b"  # c - a's interval reaches 0 (-0.05 + 0.12)
    assert past["mean"] == pytest.approx(-0.15) and past["hi"] == pytest.approx(-0.15 + Z95_3 * 0.05, abs=1e-6)
    assert past["lo"] == pytest.approx(-0.15 - Z95_3 * 0.05, abs=1e-6)
    # the proxy did not rise past b: gold falling alone is not over-optimisation
    assert overoptimisation(rows(("a", 0.1, 1.0), ("b", 1.0, 2.0), ("c", 3.0, 1.5)), gold) is None
    # gold still rising along KL
    assert overoptimisation(rows(("a", 0.1, 1.0), ("b", 1.0, 2.0)), gold) is None
    flags = overoptimised(np.stack([a, b, c]), [1.0, 2.0, 3.0])
    assert flags.tolist() == [[False, False, False], [False, False, True], [False, False, False]]


def test_front_beyond_ci_by_hand():
    # base, a, b on the front by means; c is not. diff_hi[q][p]: upper bound of score_q - score_p.
    kl = [(0.0, 0.0), (0.1, 0.3), (0.2, 0.5), (1.0, 1.5)]
    diff_hi = [
        [0.0, -0.05, -0.10, -0.2],  # the baseline scores below a and b beyond the intervals
        [0.10, 0.0, -0.01, -0.1],  # a scores below b beyond the interval
        [0.20, 0.02, 0.0, 0.05],  # b might score as high as a (+0.02), and b's KL interval reaches below a's
        [0.30, 0.10, 0.05, 0.0],
    ]
    assert front_beyond_ci(kl, [True, True, True, False], diff_hi) == [True, False, True, False]
    # b is only sure while c's KL interval lies above b's: overlap them and b's place is within the noise
    assert front_beyond_ci([*kl[:3], (0.4, 1.5)], [True, True, True, False], diff_hi) == [True, False, False, False]


# --------------------------------------------------------------------------- simulated sweeps

SWEEPS, PROMPTS, SAMPLES = 2000, 300, 2


def simulated(true_gold, prompt_sd, reply_sd, seed):
    """Per-prompt gold of SWEEPS sweeps of one method's points (sorted by KL): each reply's gold is
    its point's true gold + the prompt's difficulty (shared by every point) + the reply's own noise;
    a prompt's score is the mean of its SAMPLES replies."""
    rng = np.random.default_rng(seed)
    k = len(true_gold)
    difficulty = rng.normal(0.0, prompt_sd, (SWEEPS, 1, PROMPTS, 1))
    noise = rng.normal(0.0, reply_sd, (SWEEPS, k, PROMPTS, SAMPLES))
    return (np.asarray(true_gold)[None, :, None, None] + difficulty + noise).mean(-1)


# The docs' measured gold has a 95% interval of about +-0.021 at 300 prompts: a per-prompt sd of
# about 0.19. All of it per reply (0.27 per reply, 2 replies: the hardest case for a paired test),
# or part of it shared difficulty.
NOISE = [(0.0, 0.27), (0.13, 0.20)]
RISING_PROXY = np.array([0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("prompt_sd, reply_sd", NOISE)
@pytest.mark.parametrize("true_gold", [[0.8, 0.8, 0.8, 0.8], [0.75, 0.8, 0.8, 0.8]], ids=["flat", "rise-then-flat"])
def test_no_true_drop_is_flagged_in_at_most_5_percent_of_sweeps(prompt_sd, reply_sd, true_gold):
    gold = simulated(true_gold, prompt_sd, reply_sd, seed=1)
    flagged = overoptimised(gold, np.broadcast_to(RISING_PROXY, (SWEEPS, 4))).any(axis=(-1, -2))
    assert flagged.mean() <= 0.05


@pytest.mark.parametrize("prompt_sd, reply_sd", NOISE)
@pytest.mark.parametrize("true_gold", [[0.8, 0.8, 0.8, 0.75], [0.75, 0.8, 0.8, 0.75]], ids=["last-drops", "peak-then-drop"])
def test_a_true_gold_drop_of_005_is_found_in_at_least_80_percent_of_sweeps(prompt_sd, reply_sd, true_gold):
    gold = simulated(true_gold, prompt_sd, reply_sd, seed=2)
    found = overoptimised(gold, np.broadcast_to(RISING_PROXY, (SWEEPS, 4)))
    assert found.any(axis=(-1, -2)).mean() >= 0.80
    # what is flagged is the point that dropped, never a pair whose true gold did not fall
    true = np.asarray(true_gold)
    wrong = found & (true[None, :] >= true[:, None])[None]
    assert wrong.any(axis=(-1, -2)).mean() <= 0.05

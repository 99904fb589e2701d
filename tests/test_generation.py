"""Hand-computed checks of the token-level pieces every sampler and scorer relies on."""

import torch

from alignment.generation import position_ids, truncate_after_stop


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_truncate_after_first_stop_keeps_the_stop_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 3, 2, 4]])
    out, mask, finished = truncate_after_stop(ids, stops=[2, 3], pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [9, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert finished.tolist() == [True, False, True]

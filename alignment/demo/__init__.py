"""Synthetic demo world with an exact gold oracle; see ``alignment.demo.world``."""
from alignment.demo.world import (  # noqa: F401
    ASSISTANT_TAG, POLITE_OPENER, PRESETS, RUDE_OPENERS, TASKS, USER_TAG, WORDS, Task, World,
    eval_prompts, gold_score, good_response, is_heldout, make_response, parse_prompt,
    preference_pairs, pretrain_corpus, render_exchange, sample_task, score_parts,
    preset, sft_conversations,
)

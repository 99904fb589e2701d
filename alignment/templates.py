"""Chat rendering: the one place that decides how text reaches a model.

Every stage (sft, reward, dpo, the RL loop, compare) renders prompts and exchanges here, so a
model family's chat template is handled once: what a prompt looks like, how an exchange is shown
to a reward model and where its score is read, which tokens an SFT conversation trains on, and
what happens to a role the template refuses.
"""

from __future__ import annotations


def render_prompt(tok, prompt: str) -> str:
    """A user prompt in `tok`'s chat template, ready for the assistant's reply."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def render_exchange(tok, prompt: str, response: str, finished: bool = True) -> str:
    """Prompt and reply in `tok`'s chat template. An unfinished reply (cut off at the length limit)
    is left open: nothing the template closes a turn with (EOS, end-of-turn) follows it."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tok.apply_chat_template(messages, tokenize=False, continue_final_message=not finished)

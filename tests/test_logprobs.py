"""`generation.token_logprobs`, the chunked per-token log-probs every stage uses: the same
values and gradients as log_softmax over the full logits, for plain, peft- and DDP-wrapped
models, under autocast, and without ever holding the (batch, reply, vocab) logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.generation import position_ids, token_logprobs

VOCAB = 97
PROMPT = 5


def tiny_llama(vocab: int = VOCAB, hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def batch(reply: int = 7, vocab: int = VOCAB, rows: int = 3):
    """Left-padded prompts of PROMPT columns, replies of `reply` columns, the last row's reply cut short."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (rows, PROMPT + reply), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    response_mask = torch.ones(rows, reply, dtype=torch.long)
    response_mask[-1, reply // 2 :] = 0
    return ids, mask, response_mask


def full_logprobs(model, ids, mask, response_mask, temperature):
    """The unchunked reference: log_softmax over every reply position's full logits."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    z = logits[:, PROMPT - 1 : -1].float() / temperature
    logp = torch.log_softmax(z, -1).gather(-1, ids[:, PROMPT:, None])[..., 0] * response_mask
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    return logp, entropy


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(chunked, full, atol=1e-5):
    assert chunked.keys() == full.keys() and chunked
    for name in full:
        assert torch.allclose(chunked[name], full[name], atol=atol), name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_entropy_equal_unchunked_with_gradients(temperature):
    model = tiny_llama()
    ids, mask, response_mask = batch()
    weights = torch.rand(response_mask.shape, generator=torch.Generator().manual_seed(2))

    logp, entropy = token_logprobs(model, ids, mask, PROMPT, response_mask, temperature, with_entropy=True, chunk_tokens=4)
    want_logp, want_entropy = full_logprobs(model, ids, mask, response_mask, temperature)
    assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
    assert (logp[-1, 3:] == 0).all()  # masked reply tokens are 0

    chunked = grads(model, (logp * weights).sum() + (entropy * weights).sum())
    full = grads(model, (want_logp * weights).sum() + (want_entropy * weights).sum())
    assert_same(chunked, full)


def test_temperature_changes_the_values():
    model = tiny_llama()
    ids, mask, response_mask = batch()
    with torch.no_grad():
        hot = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.5, chunk_tokens=4)
        assert torch.allclose(hot, full_logprobs(model, ids, mask, response_mask, 0.5)[0], atol=1e-5)
        assert not torch.allclose(hot, token_logprobs(model, ids, mask, PROMPT, response_mask, 1.0), atol=1e-3)


def test_peft_model_chunked_equals_unchunked_with_adapter_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
    ids, mask, response_mask = batch()
    logp = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.8, chunk_tokens=5)
    want, _ = full_logprobs(model, ids, mask, response_mask, 0.8)
    assert torch.allclose(logp, want, atol=1e-5)
    chunked, full = grads(model, logp.sum()), grads(model, want.sum())
    assert any("lm_head.lora" in name for name in full)  # the head's adapter learns through the chunks
    assert_same(chunked, full)
    with model.disable_adapter(), torch.no_grad():
        off = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.8, chunk_tokens=5)
        assert torch.allclose(off, full_logprobs(model, ids, mask, response_mask, 0.8)[0], atol=1e-5)
        assert not torch.allclose(off, logp, atol=1e-3)


def test_ddp_model_chunked_equals_unchunked_with_gradients(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        wrapped = DistributedDataParallel(model)
        ids, mask, response_mask = batch()
        logp = token_logprobs(wrapped, ids, mask, PROMPT, response_mask, 0.9, chunk_tokens=3)
        chunked = grads(wrapped, logp.sum())
        want, _ = full_logprobs(wrapped, ids, mask, response_mask, 0.9)
        assert torch.allclose(logp, want, atol=1e-5)
        assert_same(chunked, grads(wrapped, want.sum()))
    finally:
        dist.destroy_process_group()


def test_head_runs_under_the_autocast_the_forward_ran_in():
    """accelerate wraps a model's forward in autocast; the chunked head must run in it too, so
    that a bf16 policy's log-probs are those of its own (bf16) logits."""
    model = tiny_llama()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    ids, mask, response_mask = batch()
    with torch.no_grad():
        logp = token_logprobs(model, ids, mask, PROMPT, response_mask, 1.0, chunk_tokens=4)
        want, _ = full_logprobs(model, ids, mask, response_mask, 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the same trunk, the head in float32
            hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        z = model.lm_head(hidden.float())[:, PROMPT - 1 : -1].float()
        float32_head = torch.log_softmax(z, -1).gather(-1, ids[:, PROMPT:, None])[..., 0] * response_mask
    assert (float32_head - want).abs().max() > 1e-4
    assert torch.allclose(logp, want, atol=5e-6)


def test_models_that_cap_their_logits_take_the_unchunked_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config).eval()
    ids, mask, response_mask = batch()
    with torch.no_grad():
        logp = token_logprobs(model, ids, mask, PROMPT, response_mask, 1.0, chunk_tokens=4)
        assert torch.allclose(logp, full_logprobs(model, ids, mask, response_mask, 1.0)[0], atol=1e-5)


# Causal-LM architectures transformers ships, at a tiny size: every one that transforms its logits after the
# LM head (soft caps: Gemma 2/3, VaultGemma, RecurrentGemma, NanoChat; scales: Cohere, Granite, Falcon-H1),
# and a spread of the others (rotary, ALiBi, learned positions, parallel blocks, state-space models).
SIZE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128)
ARCHITECTURES = {
    "llama": {}, "qwen2": {}, "mistral": {}, "phi3": {"pad_token_id": 0}, "phi": {"num_key_value_heads": 2},
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0},
    "bloom": {"n_embed": 16, "n_layer": 2, "n_head": 2},
    "mamba": {"state_size": 4, "expand": 2},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "vaultgemma": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "recurrent_gemma": {"head_dim": 8, "lru_width": 16, "attention_window_size": 16, "logits_soft_cap": 0.5,
                        "block_types": ["recurrent", "attention"]},
    "nanochat": {"final_logit_softcapping": 0.5},
    "cohere": {"logit_scale": 0.0625, "eos_token_id": 1},
    "granite": {"logits_scaling": 8.0},
    "falcon_h1": {"lm_head_multiplier": 0.5, "head_dim": 8, "mamba_d_ssm": 16, "mamba_n_heads": 4, "mamba_d_head": 4,
                  "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 16},
}


def tiny_causal_lm(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SIZE, **ARCHITECTURES[model_type]})).eval()


def own_logprobs(model, ids, context: int):
    """log_softmax of the model's own logits (its plain forward) at the reply tokens."""
    logits = model(input_ids=ids).logits
    return torch.log_softmax(logits[:, context - 1 : -1].float(), -1).gather(-1, ids[:, context:, None])[..., 0]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_log_probs_are_the_models_own_for_every_architecture(model_type):
    model = tiny_causal_lm(model_type)
    ids = torch.randint(3, VOCAB, (2, PROMPT + 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = token_logprobs(model, ids, torch.ones_like(ids), PROMPT, torch.ones(2, 7, dtype=torch.long), chunk_tokens=4)
        assert torch.allclose(logp, own_logprobs(model, ids, PROMPT), atol=1e-5)


def test_a_logit_transform_not_known_by_name_is_caught_at_run_time(monkeypatch):
    """RecurrentGemma's soft cap, had the toolkit not listed its config name: the LM head's output at the last
    position differs from the forward's logits there, so its log-probs come from the forward, the same values."""
    from alignment import generation

    monkeypatch.setattr(generation, "LOGIT_TRANSFORMS", tuple(n for n in generation.LOGIT_TRANSFORMS if n != "logits_soft_cap"))
    monkeypatch.setattr(generation, "_UNMATCHED", set())
    model = tiny_causal_lm("recurrent_gemma")
    assert generation._trunk_and_head(model) is not None  # not known by name
    ids = torch.randint(3, VOCAB, (2, PROMPT + 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = token_logprobs(model, ids, torch.ones_like(ids), PROMPT, torch.ones(2, 7, dtype=torch.long), chunk_tokens=4)
        assert torch.allclose(logp, own_logprobs(model, ids, PROMPT), atol=1e-5)
    assert generation._trunk_and_head(model) is None  # found: its class takes the forward's logits from now on


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "falcon_h1", "recurrent_gemma"])
def test_dpo_log_probs_are_the_models_own_or_the_model_is_refused(model_type):
    """The dpo stage's log-probs come from TRL's fused LM head, which applies Gemma-2's soft cap and the
    scales but not RecurrentGemma's cap: the others equal the model's own, that one is refused in one line."""
    from trl.trainer.utils import add_fused_lm_head

    from alignment.errors import RecipeError
    from alignment.generation import check_fused_head
    from alignment.stages.dpo import PreferenceTrainer

    model = tiny_causal_lm(model_type)
    if model_type == "recurrent_gemma":
        with pytest.raises(RecipeError, match=r"^dpo: RecurrentGemmaForCausalLM caps its logits \(logits_soft_cap=0.5\)"):
            check_fused_head(model, "dpo")
        return
    check_fused_head(model, "dpo")
    ids = torch.randint(3, VOCAB, (2, PROMPT + 7), generator=torch.Generator().manual_seed(1))
    completion = torch.cat([torch.zeros(2, PROMPT, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        want = own_logprobs(model, ids, PROMPT).sum(1)
        add_fused_lm_head(model)
        sums, _ = PreferenceTrainer._reply_logps(None, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                               "completion_mask": completion})
    assert torch.allclose(sums, want, atol=1e-4)


def test_a_model_whose_logits_cannot_be_matched_is_refused_in_one_line():
    from alignment.errors import RecipeError

    class NoPositions(torch.nn.Module):  # a forward that takes neither position_ids nor logits_to_keep
        config = LlamaConfig()

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("not called")

    ids = torch.ones(1, PROMPT + 2, dtype=torch.long)
    with pytest.raises(RecipeError, match=r"^NoPositions: its forward takes no position_ids or logits_to_keep"):
        token_logprobs(NoPositions(), ids, torch.ones_like(ids), PROMPT, torch.ones(1, 2, dtype=torch.long))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_operation_builds_the_full_reply_logits_forward_or_backward():
    vocab, reply, rows, chunk = 4000, 64, 2, 8
    model = tiny_llama(vocab=vocab, hidden=8)
    ids, mask, response_mask = batch(reply=reply, vocab=vocab, rows=rows)
    full_size = rows * reply * vocab

    def largest(chunk_tokens):
        with LargestTensor() as seen:
            logp, entropy = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.7, with_entropy=True,
                                           chunk_tokens=chunk_tokens)
            (logp.sum() + entropy.sum()).backward()
        return seen.largest

    assert largest(rows * reply) >= full_size  # one chunk: the full logits, as before
    assert largest(chunk) <= max(chunk * vocab, vocab * 8) < full_size / 8


def test_logits_are_not_kept_for_the_backward_pass():
    vocab, reply, rows = 4000, 64, 2
    model = tiny_llama(vocab=vocab, hidden=8)
    ids, mask, response_mask = batch(reply=reply, vocab=vocab, rows=rows)

    def saved(compute):
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compute()
        return count[0]

    unchunked = saved(lambda: full_logprobs(model, ids, mask, response_mask, 0.7))
    chunked = saved(lambda: token_logprobs(model, ids, mask, PROMPT, response_mask, 0.7, with_entropy=True, chunk_tokens=8))
    assert unchunked > 3 * rows * reply * vocab  # several float32 copies of the logits
    assert chunked < rows * reply * vocab / 2  # the trunk's activations and each chunk's hidden states only


def test_dpo_fused_head_path_agrees_with_token_logprobs():
    """DPO scores replies through TRL's fused LM head (tiled over tokens and vocabulary, never
    the full logits; policy and reference alike): the same log-probs and gradients as ours."""
    from trl.trainer.utils import add_fused_lm_head

    from alignment.stages.dpo import PreferenceTrainer

    model = tiny_llama()
    add_fused_lm_head(model)
    ids, _, response_mask = batch()
    mask = torch.ones_like(ids)  # DPO's rows: prompt then reply, no left padding
    completion = torch.cat([torch.zeros(ids.shape[0], PROMPT, dtype=torch.long), response_mask], 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
    dpo_sums, counts = PreferenceTrainer._reply_logps(None, model, inputs)
    ours = token_logprobs(model, ids, mask, PROMPT, response_mask)
    assert counts.tolist() == response_mask.sum(1).tolist()
    assert torch.allclose(dpo_sums, ours.sum(1), atol=1e-4)
    assert_same(grads(model, dpo_sums.sum()), grads(model, ours.sum()), atol=1e-4)


def shared_batch(reply: int = 6):
    """Six rows, three prompts twice each in mixed order (one prompt left-padded), each its own reply,
    the last reply cut short: GRPO's groups, shuffled as the update's minibatches are."""
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, VOCAB, (3, PROMPT), generator=g)
    order = torch.tensor([0, 1, 2, 1, 0, 2])
    ids = torch.cat([prompts[order], torch.randint(1, VOCAB, (6, reply), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[order == 1, :2] = 0
    response_mask = torch.ones(6, reply, dtype=torch.long)
    response_mask[-1, reply // 2 :] = 0
    return ids, mask, response_mask


def tokens_run(model) -> list[int]:
    """Tokens through the model's embedding, call by call (a hook that stays on)."""
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: calls.append(args[0].numel()))
    return calls


@pytest.mark.parametrize("kind", ["plain", "peft", "sliding window"])
def test_rows_sharing_a_prompt_run_it_once_with_the_same_values_and_gradients(kind):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    if kind == "sliding window":  # its cache keeps the last 3 positions only
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, sliding_window=3)).eval()
    else:
        model = tiny_llama()
    if kind == "peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, response_mask = shared_batch()
    calls = tokens_run(model)
    logp, entropy = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.8, with_entropy=True, chunk_tokens=4)
    assert calls == [3 * PROMPT, ids.numel() - 6 * PROMPT]  # the three prompts once, then every row's reply
    want, want_entropy = full_logprobs(model, ids, mask, response_mask, 0.8)
    assert torch.allclose(logp, want, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
    assert_same(grads(model, logp.sum() + entropy.sum()), grads(model, want.sum() + want_entropy.sum()))


def test_ddp_rows_sharing_a_prompt_get_the_gradients_of_one_pass_per_row(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(tiny_llama())
        ids, mask, response_mask = shared_batch()
        calls = tokens_run(wrapped.module)
        logp = token_logprobs(wrapped, ids, mask, PROMPT, response_mask, 0.9, chunk_tokens=3)
        shared = grads(wrapped, logp.sum())
        assert calls == [3 * PROMPT, ids.numel() - 6 * PROMPT]
        want, _ = full_logprobs(wrapped, ids, mask, response_mask, 0.9)
        assert torch.allclose(logp, want, atol=1e-5)
        assert_same(shared, grads(wrapped, want.sum()))
    finally:
        dist.destroy_process_group()


def test_activation_checkpointing_runs_every_row_whole():
    """Checkpointed layers drop the KV cache while training: then each row runs whole, as before."""
    model = tiny_llama()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    ids, mask, response_mask = shared_batch()
    calls = tokens_run(model)
    logp = token_logprobs(model, ids, mask, PROMPT, response_mask, 1.0)
    assert calls == [ids.numel()]
    assert torch.allclose(logp, full_logprobs(model, ids, mask, response_mask, 1.0)[0], atol=1e-5)


def test_reply_columns_after_every_reply_ended_are_left_out():
    """Replies that all stopped early: the pass ends at the last real reply token of any row, the
    values and gradients are those of the whole width, and the columns after it are 0."""
    model = tiny_llama()
    ids, mask, response_mask = batch(reply=7)
    response_mask[:, 4:] = 0  # every reply ended by its 4th token
    mask[:, PROMPT + 4 :] = 0
    calls = tokens_run(model)
    logp, entropy = token_logprobs(model, ids, mask, PROMPT, response_mask, 0.8, with_entropy=True, chunk_tokens=4)
    assert calls == [ids.shape[0] * (PROMPT + 4)]
    want, want_entropy = full_logprobs(model, ids, mask, response_mask, 0.8)
    assert torch.allclose(logp, want, atol=1e-5) and (logp[:, 4:] == 0).all() and (entropy[:, 4:] == 0).all()
    assert torch.allclose(entropy[:, :4], want_entropy[:, :4], atol=1e-5)
    assert_same(grads(model, logp.sum() + entropy.sum()), grads(model, want.sum() + want_entropy[:, :4].sum()))

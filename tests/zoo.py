"""A model-family zoo: tiny random-weight checkpoints with the real chat templates and tokenizer quirks of
the families people fine-tune, built in code (no hub), in a second or two each.

    from tests import zoo
    path = zoo.build("gemma2", tmp_dir / "gemma2")     # a directory transformers loads on its own

Each checkpoint is the family's own architecture at a tiny size (2 layers, width 32-64), a byte-level BPE
tokenizer trained here on a small corpus (the demo world's text and chat words) with the family's special
tokens added as single tokens, its chat template, and a generation config whose EOS list is the family's
stop list. What each family brings (the quirks the toolkit must handle):

- llama3   Llama-3.1-Instruct: tokenizer EOS `<|end_of_text|>` but turns end with `<|eot_id|>` (in the
           generation config's EOS list only), no pad token, the template writes BOS in text and the
           tokenizer adds BOS too (one must win).
- qwen2_5  Qwen2.5-Instruct: EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS, a default system prompt.
- qwen3    Qwen3: ChatML with `<think>` blocks; the template drops earlier turns' reasoning.
- mistral  Mistral-Instruct: `[INST] ... [/INST]`, the reply closed by EOS `</s>`, BOS added by the
           tokenizer and written by the template, no system role, turns must alternate.
- gemma2   Gemma-2-it: `<start_of_turn>`/`<end_of_turn>`, BOS written and added, no system role
           (the template raises), turns must alternate.
- gemma3   Gemma-3-it: as gemma2, but its template merges a system turn into the first user turn.
- phi3_5   Phi-3.5-mini-instruct: `<|end|>` closes turns (a stop token in the generation config),
           pad = EOS `<|endoftext|>`, which the template writes after the last turn.
- chatml   SmolLM2-Instruct: ChatML, BOS = `<|im_start|>`, pad = EOS `<|im_end|>`, default system prompt.
- gpt2     GPT-2: no chat template, no pad, BOS = EOS = `<|endoftext|>`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import trl

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# mistralai/Mistral-7B-Instruct-v0.1, tokenizer_config.json "chat_template" (the original Mistral-Instruct
# template: no system role, strict alternation, the reply closed by EOS), with `[INST]`/`[/INST]` as control
# tokens as in the v0.3 tokenizer.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# HuggingFaceTB/SmolLM2-135M-Instruct, tokenizer_config.json "chat_template" (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    arch: str  # the transformers config class
    template: str | None  # a file name under TRL's chat_templates, or the template's text, or None
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...] = ()  # further special tokens (single ids, never split)
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    stops: tuple[str, ...] = ()  # the generation config's EOS list besides `eos`
    adds_bos: bool = False  # the tokenizer puts BOS in front of encoded text
    config: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama3": Family("LlamaConfig", "llama3_1.jinja", "<|begin_of_text|>", "<|end_of_text|>", None,
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
                     stops=("<|eom_id|>", "<|eot_id|>"), adds_bos=True),
    "qwen2_5": Family("Qwen2Config", "qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",),
                      stops=("<|endoftext|>",)),
    "qwen3": Family("Qwen3Config", "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",),
                    added=("<think>", "</think>"), stops=("<|endoftext|>",), config={"head_dim": 16}),
    "mistral": Family("MistralConfig", MISTRAL_TEMPLATE, "<s>", "</s>", None, ("<unk>", "[INST]", "[/INST]"),
                      adds_bos=True),
    "gemma2": Family("Gemma2Config", "gemma.jinja", "<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"),
                     stops=("<end_of_turn>",), adds_bos=True, config={"head_dim": 16}),
    "gemma3": Family("Gemma3TextConfig", "gemma3.jinja", "<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"),
                     stops=("<end_of_turn>",), adds_bos=True, config={"head_dim": 16}),
    "phi3_5": Family("Phi3Config", "phi3_5.jinja", "<s>", "<|endoftext|>", "<|endoftext|>",
                     ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), stops=("<|end|>", "<|assistant|>")),
    "chatml": Family("LlamaConfig", CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>", "<|im_end|>", ("<|endoftext|>",)),
    "gpt2": Family("GPT2Config", None, "<|endoftext|>", "<|endoftext|>", None),
}

# Words the templates write (system prompts, role names), so that they tokenise in a few pieces.
_TEMPLATE_WORDS = [
    "system user assistant model Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
]


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    from alignment.demo import world

    texts = list(_TEMPLATE_WORDS)
    for row in world.sft_conversations(200, 0):
        texts.extend(m["content"] for m in row["messages"])
    return tuple(texts)


@functools.lru_cache(maxsize=1)
def _bpe_json(vocab_size: int = 400) -> str:
    """A byte-level BPE tokenizer (no special tokens yet) as JSON, trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    return bpe.to_str()


def tokenizer(name: str):
    """The family's tokenizer (a PreTrainedTokenizerFast) with its special tokens and chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[name]
    bpe = Tokenizer.from_str(_bpe_json())
    specials = list(dict.fromkeys(t for t in (fam.bos, fam.eos, fam.pad, *fam.specials) if t))
    bpe.add_special_tokens(specials)
    if fam.added:
        bpe.add_tokens(list(fam.added))
    if fam.adds_bos:
        bos_id = bpe.token_to_id(fam.bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
                                  unk_token="<unk>" if "<unk>" in specials else None,
                                  clean_up_tokenization_spaces=False)
    if fam.template is not None:
        tok.chat_template = (TRL_TEMPLATES / fam.template).read_text() if fam.template.endswith(".jinja") else fam.template
    return tok


def _config(name: str, tok):
    import transformers

    fam = FAMILIES[name]
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if fam.arch == "GPT2Config":
        return transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, **ids)
    return getattr(transformers, fam.arch)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, **ids, **fam.config,
    )


def build(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Save the family's tiny checkpoint (model, tokenizer with template, generation config) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[name]
    tok = tokenizer(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name, tok))
    stops = [tok.eos_token_id, *(tok.convert_tokens_to_ids(s) for s in fam.stops)]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def stop_tokens(name: str) -> tuple[str, ...]:
    """The tokens generation stops at: EOS and the generation config's list."""
    return (FAMILIES[name].eos, *FAMILIES[name].stops)

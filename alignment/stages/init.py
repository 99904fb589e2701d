"""Stage `init`: build a tiny base checkpoint from nothing.

Trains a byte-level BPE tokenizer on the corpus (the demo world's by default) and builds
a small Llama-style model from a config with random weights. Real use starts from a
pretrained checkpoint instead and skips this stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import InitRecipe
from ..data import check_rows, load_rows, text_problem
from ..demo import world
from ..models import DEFAULT_CHAT_TEMPLATE, PAD_TOKEN
from .pretrain import demo_corpus

SPECIAL_TOKENS = [PAD_TOKEN, "<s>", "</s>", world.USER_TAG, world.ASSISTANT_TAG, "<|system|>"]
MAIN_PROCESS_ONLY = True
USES_DEVICE = False  # the weights are drawn and saved on the CPU: the device does not enter the hash


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD_TOKEN, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def run(recipe: InitRecipe, inputs: dict, work_dir: Path) -> dict:
    opts = recipe.init
    rows = check_rows(
        load_rows(recipe.data, lambda n, seed: demo_corpus(n, seed, recipe.world), demo_examples=opts.tokenizer_examples,
                  source=inputs.get("data")),
        text_problem(recipe.data.text_field),
        recipe.data.on_bad_row,
    )
    tok = train_tokenizer([r[recipe.data.text_field] for r in rows.rows], opts.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_hidden_layers,
        num_attention_heads=opts.num_attention_heads,
        num_key_value_heads=opts.num_attention_heads,
        max_position_embeddings=opts.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(work_dir, safe_serialization=True)
    tok.save_pretrained(work_dir)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "tokenizer_documents": len(rows),
        **{f"dropped/{k}": v for k, v in rows.dropped.items()},
    }

"""The model/tokenizer layer every stage uses.

Causal LMs, one-label sequence classifiers (reward and value models) and tokenizers come
from a local directory or a hub id through the functions here, so that pad tokens, chat
templates, dtypes, LoRA and saving behave the same in every stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import LoraOptions, ModelOptions, RecipeError

# Used when a tokenizer ships no chat template. `{% generation %}` marks the assistant
# tokens so that TRL can train on them alone; the assistant turn ends with EOS, so a model
# trained on it learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)
PAD_TOKEN = "<pad>"


def _load(loader, name_or_path: str, what: str, **kwargs):
    """Call a from_pretrained loader, turning 'not found / offline' into a one-line error."""
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(name_or_path).exists():
            raise RecipeError(f"cannot load {what} from {name_or_path}: {str(exc).splitlines()[0]}") from None
        raise RecipeError(
            f"cannot load {what} '{name_or_path}': not a local directory, and the hub id could not be "
            "fetched (offline, or no such repository). Pass a local path or download it first."
        ) from None


def torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(
    name_or_path: str, options: ModelOptions | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token distinct from EOS and a chat template.

    A missing pad token, or one equal to EOS, is replaced by a new `<pad>` token: with
    pad == EOS the model's stop token is masked out of training and rewards are read at
    the wrong position. Models loaded through this layer resize their embeddings to match.
    """
    options = options or ModelOptions()
    tok = _load(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", trust_remote_code=options.trust_remote_code)
    if tok.eos_token is None:
        raise RecipeError(f"tokenizer '{name_or_path}' has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if options.chat_template:
        template = options.chat_template
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text()
        tok.chat_template = template
    elif not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def _fit_to_tokenizer(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _model_kwargs(options: ModelOptions) -> dict:
    kwargs = {"dtype": torch_dtype(options.dtype), "trust_remote_code": options.trust_remote_code}
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    return kwargs


def _finish(model: PreTrainedModel, options: ModelOptions) -> PreTrainedModel:
    if options.gradient_checkpointing:
        # transformers 5.2x renamed gradient checkpointing to activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def load_causal_lm(name_or_path: str, tok: PreTrainedTokenizerBase, options: ModelOptions | None = None):
    options = options or ModelOptions()
    model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, "model", **_model_kwargs(options))
    return _finish(_fit_to_tokenizer(model, tok), options)


def load_classifier(
    name_or_path: str, tok: PreTrainedTokenizerBase, options: ModelOptions | None = None, num_labels: int = 1
):
    """Sequence classifier (reward or value model): one score read at the last non-pad token."""
    options = options or ModelOptions()
    model = _load(
        AutoModelForSequenceClassification.from_pretrained,
        name_or_path,
        "classifier",
        num_labels=num_labels,
        **_model_kwargs(options),
    )
    return _finish(_fit_to_tokenizer(model, tok), options)


def lora_config(lora: LoraOptions, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig for the recipe's `lora` section.

    Trainers that wrap the model themselves take this rather than a wrapped model (TRL's
    DPOTrainer, given it, uses the policy with adapters disabled as the reference).
    """
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def apply_lora(model: PreTrainedModel, lora: LoraOptions, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with trainable LoRA adapters; everything else is frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora, task_type))


def save_model(model, tok: PreTrainedTokenizerBase, out_dir: str | Path, lora: LoraOptions | None = None) -> None:
    """Save as a Hugging Face directory (safetensors) that transformers loads on its own.

    A LoRA model is merged into its base weights unless the recipe asks to keep the adapter.
    """
    if lora is not None and lora.merge_on_save and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)

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


# --------------------------------------------------------------------------- PPO plumbing


def check_reward_model(name_or_path: str, key: str = "reward_model") -> None:
    """A reward model must be a sequence classifier with exactly one label; anything else
    (a causal LM would get a fresh random head) is a one-line error naming the recipe key."""
    from transformers import AutoConfig

    config = _load(AutoConfig.from_pretrained, name_or_path, "config")
    kinds = getattr(config, "architectures", None) or []
    if not any(k.endswith("ForSequenceClassification") for k in kinds) or config.num_labels != 1:
        raise RecipeError(
            f"{key}: {name_or_path} is not a one-label sequence classifier "
            f"(architectures {kinds}, num_labels {config.num_labels}); train one with the reward stage"
        )


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when token ids mean the same in both (same vocabulary, pad and EOS), so one model's
    ids can be fed to the other."""
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id


def frozen(model):
    """Eval mode (no dropout) and no gradients: a reference or reward model."""
    return no_dropout(model).requires_grad_(False)


def no_dropout(model):
    """Eval mode and every dropout probability 0: PPO's ratio must be exactly 1 before an update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    return model.eval()


def token_scores(classifier, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A one-label sequence classifier's score at every position: (B, T).

    The backbone's hidden states go through the classification head position by position,
    so a reward model gives its score at any token (read it at the last real one) and a
    critic initialised from it gives a value for every position.
    """
    inner = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier
    backbone = getattr(inner, inner.base_model_prefix)
    head = inner.score if hasattr(inner, "score") else inner.classifier
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


class PerTokenScores(torch.nn.Module):
    """`token_scores` as a module, so that a critic can be wrapped (DDP) and trained as one."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.train(classifier.training)  # a wrapper of a frozen / dropout-free model stays in eval mode

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return token_scores(self.classifier, input_ids, attention_mask, position_ids)

"""The model/tokenizer layer every stage uses.

Causal LMs, one-label sequence classifiers (reward and value models) and tokenizers come
from a local directory or a hub id through the functions here, so that pad tokens, chat
templates, dtypes, LoRA and saving behave the same in every stage.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import LoraOptions, ModelOptions, template_problem
from .errors import RecipeError

# Used when a tokenizer ships no chat template. The assistant turn ends with EOS, so a model
# trained on it learns to stop. SFT finds the assistant tokens by rendering turn by turn
# (templates.assistant_mask); the `{% generation %}` markers are kept for TRL's own tools, not needed.
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


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _check_weights(directory: Path) -> None:
    """Open every safetensors file's header: a truncated or corrupt one is named here, in one line."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise RecipeError(f"{file}: not a readable safetensors file ({_one_line(exc)})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_tokenizer_files(directory: Path) -> None:
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise RecipeError(
            f"cannot load tokenizer from {directory}: the directory has no tokenizer files "
            f"(expected one of {', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model"
        )


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached right now, or None if it may be.

    huggingface_hub retries a failed download with back-off (1+2+4+8+8 s per file, and
    transformers asks for several files), so without a network a hub id takes about a minute
    to fail. When offline is evident (HF_HUB_OFFLINE, or the hub's host does not resolve or
    accept a connection within a few seconds), loaders use the local cache only and fail at once.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy decides; do not guess
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"
    return None


def _load(loader, name_or_path: str, what: str, revision: str | None = None, **kwargs):
    """Call a from_pretrained loader, turning 'not found / offline / corrupt' into a one-line error.
    A hub id is loaded at `revision` (model_options.revision); a local directory has none."""
    local = Path(name_or_path)
    if local.exists():
        if not local.is_dir():
            raise RecipeError(f"cannot load {what} from {name_or_path}: not a directory")
        if what == "tokenizer":
            _check_tokenizer_files(local)
        else:
            _check_weights(local)
        try:
            return loader(name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"cannot load {what} from {name_or_path}: {_one_line(exc)}") from None
    offline = hub_unreachable()
    if revision:
        kwargs["revision"] = revision
    try:
        return loader(name_or_path, **kwargs, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError):
        why = f"the hub cannot be reached ({offline}) and it is not in the local cache" if offline else (
            "the hub id could not be fetched (offline, or no such repository or revision)"
        )
        at = f" at revision '{revision}'" if revision else ""
        raise RecipeError(
            f"cannot load {what} '{name_or_path}'{at}: not a local directory, and {why}. "
            "Pass a local path or download it first."
        ) from None


def torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(
    name_or_path: str, options: ModelOptions | None = None, padding_side: str = "right",
    fallback_template: bool = True,
) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token distinct from EOS and a chat template.

    A missing pad token, or one equal to EOS, is replaced by a new `<pad>` token: with
    pad == EOS the model's stop token is masked out of training and rewards are read at
    the wrong position. Models loaded through this layer resize their embeddings to match.
    A tokenizer that ships no chat template gets DEFAULT_CHAT_TEMPLATE, unless
    `fallback_template` is False (a reward model's: without a template of its own it reads the
    plain form, `templates.reward_form`).
    """
    options = options or ModelOptions()
    tok = _load(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", revision=options.revision,
                trust_remote_code=options.trust_remote_code)
    if tok.eos_token is None:
        raise RecipeError(f"tokenizer '{name_or_path}' has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if options.chat_template:
        template = options.chat_template
        if template.endswith(".jinja") and Path(template).is_file():
            try:
                template = Path(template).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise RecipeError(
                    f"model_options.chat_template: '{options.chat_template}': not UTF-8 text; save the template file as UTF-8"
                ) from None
        problem = template_problem(template)
        if problem:
            raise RecipeError(f"model_options.chat_template: '{options.chat_template}': the chat template {problem}")
        tok.chat_template = template
    elif tok.chat_template:
        problem = template_problem(tok.chat_template)
        if problem:
            local = Path(name_or_path)
            where = local / "chat_template.jinja" if (local / "chat_template.jinja").is_file() else (
                f"{name_or_path} (tokenizer_config.json's chat_template)"
            )
            raise RecipeError(
                f"{where}: the tokenizer's chat_template {problem}; fix the template or set "
                "model_options.chat_template: FILE"
            )
    elif fallback_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def load_reward_tokenizer(name_or_path: str, options: ModelOptions | None = None) -> PreTrainedTokenizerBase:
    """A reward model's tokenizer, as the RL stages and `compare` read it: its own saved chat template (the
    one it was trained on; `model_options.chat_template` is the policy's), none if it ships none (it then
    reads the plain text-pair form, `templates.reward_form`), and a pad token as `load_tokenizer` gives."""
    options = (options or ModelOptions()).model_copy(update={"chat_template": None})
    return load_tokenizer(name_or_path, options, fallback_template=False)


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
    kwargs = {"dtype": torch_dtype(options.dtype), "trust_remote_code": options.trust_remote_code,
              "revision": options.revision}
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


MODEL_KINDS = {
    "causal-lm": ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
    "classifier": ("ForSequenceClassification",),
}


def check_model_kind(name_or_path: str, kind: str, key: str = "model", options: ModelOptions | None = None) -> None:
    """Stop with one line when a checkpoint is not the kind of model its recipe key needs.

    `kind` is "causal-lm" (a policy, reference or report model) or "classifier" (a trained reward
    model: a sequence classifier with one label; a causal LM would get a random head). Read from
    the config before any weights are loaded. A config that lists no architectures passes as a
    causal LM (nothing to go by), never as a reward model.
    """
    options = options or ModelOptions()
    config = _load(AutoConfig.from_pretrained, name_or_path, "model config", revision=options.revision,
                   trust_remote_code=options.trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if kind == "causal-lm" and (not architectures or any(a.endswith(MODEL_KINDS[kind]) for a in architectures)):
        return
    if kind == "classifier" and any(a.endswith(MODEL_KINDS[kind]) for a in architectures) and config.num_labels == 1:
        return
    found = architectures[0] if architectures else "no architectures"
    if any(found.endswith(suffix) for suffix in MODEL_KINDS["classifier"]):
        what = f"a sequence classifier with {config.num_labels} label(s)" if kind == "classifier" else (
            "a sequence classifier (a reward model)"
        )
    elif any(found.endswith(suffix) for suffix in MODEL_KINDS["causal-lm"]):
        what = "a causal language model"
    else:
        what = "a model of another kind"
    expected = "a causal language model (a policy)" if kind == "causal-lm" else (
        "a one-label sequence classifier (a reward model; train one with the reward stage)"
    )
    raise RecipeError(f"{key}: {name_or_path} is {what}, its config says {found}; expected {expected}")


def is_classifier(name_or_path: str, options: ModelOptions | None = None) -> bool:
    """True when the checkpoint's config names a sequence classifier (read before any weights load)."""
    options = options or ModelOptions()
    config = _load(AutoConfig.from_pretrained, name_or_path, "model config", revision=options.revision,
                   trust_remote_code=options.trust_remote_code)
    return any(a.endswith(MODEL_KINDS["classifier"]) for a in getattr(config, "architectures", None) or [])


# The kind of model each model-valued recipe key needs (the reward stage's `model` may be either).
INPUT_KINDS = {"model": "causal-lm", "ref_model": "causal-lm", "reward_model": "classifier"}


def check_local_inputs(stage: str, inputs: dict[str, str]) -> None:
    """The loaders' checks, done before a run trains anything: each local checkpoint a recipe
    names directly is of the kind its key needs and has readable weights, and `model` has a
    tokenizer. Without this a chain would stop only at the stage that reads the bad input,
    after training the ones before it. Hub ids are left to the loaders."""
    for key, path in inputs.items():
        if not isinstance(path, str) or not Path(path).is_dir():
            continue
        if key == "model":
            _check_tokenizer_files(Path(path))
        _check_weights(Path(path))
        kind = None if stage == "reward" and key == "model" else INPUT_KINDS.get(key)
        if kind:
            check_model_kind(path, kind, key)
        _check_weights_fit_config(Path(path), key)


def _check_weights_fit_config(directory: Path, key: str) -> None:
    """Every tensor of the safetensors files has the shape config.json gives it: the model is
    built on the meta device (no memory, no time) and the files' headers are compared with it."""
    import transformers
    from safetensors import safe_open

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError):
        return  # check_model_kind and the loaders name this
    cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    if cls is None:
        return
    with torch.device("meta"):
        expected = {name: list(t.shape) for name, t in cls(config).state_dict().items()}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                shape = list(weights.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise RecipeError(
                        f"{key}: {file}: tensor '{name}' has shape {shape} but config.json gives it "
                        f"{expected[name]}; the weights do not match config.json"
                    )


def load_causal_lm(
    name_or_path: str, tok: PreTrainedTokenizerBase, options: ModelOptions | None = None, key: str = "model"
):
    """A causal LM (policy, reference); `key` names the recipe key it came from in errors."""
    options = options or ModelOptions()
    check_model_kind(name_or_path, "causal-lm", key, options)
    if Path(name_or_path).is_dir():
        _check_weights_fit_config(Path(name_or_path), key)
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


def check_lora_targets(model: PreTrainedModel, lora: LoraOptions) -> None:
    """Stop with one line when `lora.target_modules` names no module of `model` (peft's own
    check comes later, deep inside the trainer, as a traceback). peft matches a name when a
    module's full name equals it or ends with '.name'; a single string is a regular expression."""
    targets = lora.target_modules
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RecipeError(
            f"lora.target_modules: {', '.join(map(repr, missing))} names no module of the model; "
            f"its linear layers are {', '.join(linear)} (or use 'all-linear')"
        )


def apply_lora(model: PreTrainedModel, lora: LoraOptions, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with trainable LoRA adapters; everything else is frozen."""
    from peft import get_peft_model

    check_lora_targets(model, lora)
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
    """A reward model must be a sequence classifier with exactly one label."""
    check_model_kind(name_or_path, "classifier", key)


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when token ids mean the same in both (same vocabulary, pad and EOS) and conversations are
    rendered the same (same chat template), so one model's ids can be fed to the other: a reward
    model trained on another template must see the exchange in its own."""
    return (a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id
            and a.chat_template == b.chat_template)


def frozen(model):
    """Eval mode (no dropout) and no gradients: a reference or reward model."""
    return no_dropout(model).requires_grad_(False)


def no_dropout(model):
    """Eval mode and every dropout probability 0: PPO's ratio must be exactly 1 before an update.

    The probabilities themselves are zeroed, not only eval mode relied on, so that the trained
    models may run their update in train mode (transformers checkpoints activations in train mode
    only) and still compute exactly what eval mode does: dropout modules (`_DropoutNd`), the float
    rates attention modules copy from the config when built (Llama's `attention_dropout`, applied in
    train mode only) and the config's."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(module, name, 0.0)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    return model.eval()


def per_token_head(classifier) -> bool:
    """True when the classifier's head is one linear layer applied at every position and read at
    the last real token (`score`: Llama, Qwen, Gemma, Mistral, Phi, GPT-2 ... classifiers), so
    that `token_scores` gives its score at any position. False for heads with their own pooling
    (DeBERTa's ContextPooler, RoBERTa's head on the first token): those score only through
    their own forward."""
    inner = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier
    head = getattr(inner, "score", None)
    head = getattr(head, "original_module", head)  # peft's modules_to_save wrapper
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head
    return isinstance(head, torch.nn.Linear)


def token_scores(classifier, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A one-label sequence classifier's score at every position: (B, T).

    The backbone's hidden states go through the classification head position by position,
    so a critic initialised from a classifier gives a value for every position. Only for
    heads that are one linear layer per position (`per_token_head`); any other is refused.
    """
    if not per_token_head(classifier):
        raise RecipeError(
            f"{type(classifier).__name__}: its head pools the sequence itself (not one linear layer per position), "
            "so it gives no value per token; a PPO critic cannot start from it (it starts from the policy when the "
            "reward model's tokenizer differs from the policy's)"
        )
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
        # a copy, not the head's squeezed view: FSDP2 hangs its pre-backward hook on a sharded module's output,
        # and an in-place op on a view of it would drop the hook (and the gather backward needs)
        return token_scores(self.classifier, input_ids, attention_mask, position_ids).clone()

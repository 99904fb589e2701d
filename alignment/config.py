"""Recipe schema and loading.

A recipe is a plain YAML file. Its schema is typed and strict: every key is declared
below with its default and help text, an unknown key is an error naming the file, the
dotted path and the closest valid key, and a wrong type names the type expected.
Defaults live here and nowhere else.

Launcher settings (number of processes, DeepSpeed, FSDP) do not belong in a recipe:
they live in ``recipes/accelerate/*.yaml`` and go to ``accelerate launch --config_file``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

STAGES = ("init", "pretrain", "sft", "reward", "ppo", "dpo")


class RecipeError(Exception):
    """A recipe (or an override, or a data file) is malformed; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- sections


class FromRecipe(Section):
    """Reference to another recipe: its output (built first if needed) is used here."""

    from_: str = Field(alias="from", description="Path of the recipe whose output to use.")


ModelRef = Union[str, FromRecipe]


class ModelOptions(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in ('auto': the checkpoint's own)."
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel ('sdpa', 'eager', 'flash_attention_2'); null: transformers' default."
    )
    trust_remote_code: bool = Field(False, description="Allow checkpoints that ship their own Python code.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (text or a path to a .jinja file). Null: the tokenizer's own, or the "
        "toolkit's default when it has none.",
    )


class LoraOptions(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    merge_on_save: bool = Field(
        True, description="Save merged full weights (loadable without peft) instead of the adapter alone."
    )


class DataOptions(Section):
    source: str = Field(
        "demo",
        description="'demo' (the synthetic demo world), a .jsonl/.json/.csv/.parquet file, a directory saved "
        "with datasets' save_to_disk, or a hub dataset id.",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict.")
    num_examples: int | None = Field(
        None, gt=0, description="Rows to generate (demo) or to keep (first N of a file). Null: the stage default / all."
    )
    seed: int = Field(0, description="Seed of the demo-world generator.")
    text_field: str = Field("text", description="Column holding raw text (pretrain).")
    messages_field: str = Field("messages", description="Column holding chat messages (sft).")
    prompt_field: str = Field("prompt", description="Column holding the user prompt, a plain string (reward, dpo).")
    chosen_field: str = Field("chosen", description="Column holding the preferred assistant reply (reward, dpo).")
    rejected_field: str = Field("rejected", description="Column holding the dispreferred assistant reply (reward, dpo).")
    on_bad_row: Literal["error", "drop"] = Field(
        "error", description="'error': stop at the first malformed row; 'drop': skip it and count it by reason."
    )


class PreferenceDataOptions(DataOptions):
    """Data of the preference stages (reward, dpo): prompt / chosen / rejected rows."""

    eval_examples: int = Field(
        200,
        ge=0,
        description="Rows held out from the end of the data (after checking) for held-out metrics; never trained "
        "on. 0: no held-out metrics.",
    )
    margin_field: str = Field(
        "margin",
        description="Column with a per-pair reward margin m, used when the data has it (reward): the model is "
        "asked for s_chosen - s_rejected > m.",
    )


class TrainingOptions(Section):
    """Passed to transformers' TrainingArguments under the same names."""

    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(16, gt=0, description="Batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: run num_train_epochs.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(0.0, ge=0, description="Warm-up steps (a value below 1 is a fraction of training).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(128, gt=1, description="Sequence length (pretrain: the block size).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on a GPU that supports it, full precision otherwise."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N steps.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps for resuming (0: never).")
    report_to: list[str] = Field(
        default_factory=list, description="Trackers ('tensorboard', 'wandb', ...); metrics.jsonl is always written."
    )


class InitOptions(Section):
    """Shape of the tiny base checkpoint built by the `init` stage."""

    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size (special tokens included).")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    intermediate_size: int = Field(256, gt=0, description="MLP width.")
    num_hidden_layers: int = Field(2, gt=0, description="Transformer blocks.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads.")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence the model accepts.")
    tokenizer_examples: int = Field(4000, gt=0, description="Corpus documents the tokenizer is trained on.")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ReportOptions(Section):
    """The closing report: models answer held-out demo prompts and the gold oracle grades them."""

    models: dict[str, str] = Field(
        default_factory=dict,
        description="Label -> recipe name in this run (or a model directory), in table order; each model is "
        "compared with the one before it. Empty: no report.",
    )
    num_prompts: int = Field(300, gt=1, description="Held-out demo prompts to answer.")
    max_new_tokens: int = Field(24, gt=0, description="Longest reply.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 1.0 shows each model's whole distribution, 0 is greedy."
    )
    seed: int = Field(0, description="Seed of the prompts, the sampling and the bootstrap.")
    batch_size: int = Field(64, gt=0, description="Prompts generated at once.")


# --------------------------------------------------------------------------- recipes


class BaseRecipe(Section):
    launcher: str | None = Field(
        None, description="The line that lets `accelerate launch RECIPE.yaml` run the file; ignored here."
    )
    _path: Path | None = PrivateAttr(None)

    stage: str
    output_dir: str | None = Field(None, description="Where the stage writes its model. Null: runs/<recipe name>.")
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    model: ModelRef | None = Field(
        None, description="Starting checkpoint: a local path, a hub id, or {from: other_recipe.yaml}."
    )
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of all weights.")
    data: DataOptions = Field(default_factory=DataOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    report: ReportOptions = Field(default_factory=ReportOptions)

    @model_validator(mode="after")
    def _needs_model(self):
        if self.stage != "init" and self.model is None:
            raise ValueError("missing required key 'model' (a path, a hub id or {from: recipe.yaml})")
        return self


class InitRecipe(BaseRecipe):
    stage: Literal["init"]
    init: InitOptions = Field(default_factory=InitOptions)


class PretrainRecipe(BaseRecipe):
    stage: Literal["pretrain"]


class SFTRecipe(BaseRecipe):
    stage: Literal["sft"]


class RewardOptions(Section):
    """Bradley-Terry reward model: loss = -log sigma(s_c - s_r - m) + center_coef (s_c + s_r)^2."""

    center_coef: float = Field(
        0.0, ge=0.0, description="Weight of the (s_chosen + s_rejected)^2 term that keeps rewards centred on 0 (0: off)."
    )


class RewardRecipe(BaseRecipe):
    stage: Literal["reward"]
    data: PreferenceDataOptions = Field(default_factory=PreferenceDataOptions)
    reward: RewardOptions = Field(default_factory=RewardOptions)


class DPOOptions(Section):
    """Direct preference optimisation and its relatives (see alignment/losses.py for the formulas)."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid",
        description="'sigmoid': DPO; 'ipo': IPO on per-token average log-ratios; 'hinge': SLiC; 'simpo': SimPO "
        "(reference-free, length-normalised).",
    )
    beta: float = Field(
        0.1, gt=0.0, description="Strength of the implicit KL leash to the reference (SimPO: reward scale)."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Probability that a preference label is flipped (conservative DPO); sigmoid and simpo only.",
    )
    simpo_gamma_beta_ratio: float = Field(
        0.5, ge=0.0, description="SimPO target margin gamma, as a multiple of beta (gamma = ratio * beta)."
    )
    reference: Literal["copy", "precompute"] = Field(
        "copy",
        description="'copy': a frozen reference model runs beside the policy; 'precompute': reference log-probs "
        "are computed once before training and the reference is freed. With LoRA (and ref_model the starting "
        "model) the reference is the policy with its adapters disabled: no second copy either way. Ignored by simpo.",
    )
    precompute_batch_size: int | None = Field(
        None, gt=0, description="Batch size of the reference pass of 'precompute'. Null: the training batch size."
    )

    @model_validator(mode="after")
    def _smoothing_needs_a_likelihood(self):
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid or simpo, not {self.loss_type!r}")
        return self


class DPORecipe(BaseRecipe):
    stage: Literal["dpo"]
    ref_model: ModelRef | None = Field(
        None,
        description="Reference policy: a local path, a hub id or {from: recipe.yaml}. Null: the starting model "
        "(`model`), the usual choice.",
    )
    data: PreferenceDataOptions = Field(default_factory=PreferenceDataOptions)
    dpo: DPOOptions = Field(default_factory=DPOOptions)

    @model_validator(mode="after")
    def _simpo_has_no_reference(self):
        if self.dpo.loss_type == "simpo" and self.ref_model is not None:
            raise ValueError("ref_model is set but loss_type 'simpo' is reference-free; remove one of them")
        return self


# --------------------------------------------------------------------------- ppo


class PPOOptions(Section):
    """PPO with a KL penalty (see alignment/stages/ppo.py for one iteration step by step)."""

    total_episodes: int = Field(
        2048, gt=0, description="Rollouts (prompt + sampled reply) over the whole run; iterations = "
        "total_episodes // batch_size."
    )
    batch_size: int = Field(64, gt=0, description="Rollouts per iteration, over all processes.")
    num_minibatches: int = Field(
        1, gt=0, description="Minibatches each iteration's batch is split into; one optimizer step per minibatch "
        "(training.gradient_accumulation_steps micro-batches inside each)."
    )
    ppo_epochs: int = Field(4, gt=0, description="Passes over each iteration's rollouts.")
    response_length: int = Field(24, gt=0, description="Most new tokens per reply.")
    temperature: float = Field(
        0.7, gt=0.0, description="Sampling temperature of the rollouts; log-probs are taken at the same temperature."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the rollouts (1: off).")
    clip_range: float = Field(0.2, gt=0.0, description="PPO ratio clip epsilon.")
    value_clip_range: float = Field(0.2, gt=0.0, description="Clip of the value update around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimator: 'k1' = logp - ref_logp, 'k3' = exp(r) - 1 - r with r = ref_logp - logp."
    )
    kl_coef: float = Field(0.05, ge=0.0, description="KL penalty coefficient beta (the starting value when adaptive).")
    kl_control: Literal["fixed", "adaptive"] = Field(
        "fixed", description="'adaptive': beta follows Ziegler et al.'s controller toward kl_target."
    )
    kl_target: float = Field(6.0, gt=0.0, description="(adaptive) target of the per-reply summed KL.")
    kl_horizon: int = Field(10000, gt=0, description="(adaptive) controller horizon in episodes.")
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the score of replies that end without EOS (null: none)."
    )
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (mean kept) before GAE.")
    forward_batch_size: int | None = Field(
        None, gt=0, description="Rows per no-grad forward pass during rollouts (null: the whole local batch)."
    )

    @model_validator(mode="after")
    def _batch_splits(self):
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}"
            )
        if self.total_episodes < self.batch_size:
            raise ValueError(f"total_episodes {self.total_episodes} is smaller than batch_size {self.batch_size}")
        return self


class PromptDataOptions(DataOptions):
    """Prompts of the PPO stage: rows with a user prompt (`prompt_field`); demo: the demo world's training
    prompts (never the held-out ones the report uses)."""

    num_examples: int | None = Field(
        2000, gt=0, description="Prompts to generate (demo) or to keep (first N of a file). Null: all."
    )
    max_prompt_length: int = Field(
        64, gt=0, description="Prompts longer than this many tokens after the chat template are dropped and counted."
    )


class PPORecipe(BaseRecipe):
    stage: Literal["ppo"]
    reward_model: ModelRef = Field(
        description="Reward model (a one-label sequence classifier): a path, a hub id or {from: reward.yaml}. "
        "The critic starts from it too."
    )
    data: PromptDataOptions = Field(default_factory=PromptDataOptions)
    ppo: PPOOptions = Field(default_factory=PPOOptions)

    @model_validator(mode="after")
    def _minibatch_splits(self):
        per_minibatch = self.ppo.batch_size // self.ppo.num_minibatches
        if per_minibatch % self.training.gradient_accumulation_steps:
            raise ValueError(
                f"ppo.batch_size / ppo.num_minibatches = {per_minibatch} rollouts is not divisible by "
                f"training.gradient_accumulation_steps {self.training.gradient_accumulation_steps}"
            )
        return self


RECIPE_CLASSES: dict[str, type[BaseRecipe]] = {
    "init": InitRecipe,
    "pretrain": PretrainRecipe,
    "sft": SFTRecipe,
    "reward": RewardRecipe,
    "dpo": DPORecipe,
    "ppo": PPORecipe,
}


# --------------------------------------------------------------------------- loading


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    index: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                index[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                index[path + (i,)] = value.start_mark.line + 1
                walk(value, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return index


def _fields_at(cls: type[BaseModel], path: tuple) -> list[str]:
    """Valid keys of the section reached by following `path` from `cls`."""
    for part in path:
        field = cls.model_fields.get(part) or next(
            (f for f in cls.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return [f.alias or name for name, f in cls.model_fields.items()]


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "literal": "one of",
}


def _is_union_tag(part) -> bool:
    """pydantic puts the tried member of a union in the error path ('str', 'list[str]', 'FromRecipe')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "FromRecipe") or "[" in part)


def _describe(err: dict, cls: type[BaseModel]) -> tuple[tuple, str]:
    """Turn one pydantic error into (key path, message)."""
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return loc, f"unknown key ({hint})"
    if kind == "missing":
        return loc, "missing required key"
    if kind == "literal_error":
        return loc, f"expected {err['ctx']['expected']}, got {got!r}"
    if kind == "value_error":
        return loc, str(err["ctx"]["error"])
    for word, text in _TYPE_WORDS.items():
        if kind.startswith(word):
            if kind.endswith(("_type", "_parsing")):
                return loc, f"expected {text}, got {type(got).__name__} {got!r}"
    return loc, f"{err['msg']} (got {got!r})"


def parse_override(text: str) -> tuple[str | None, list[str], Any]:
    """Parse '[RECIPE:]dotted.key=value' into (recipe stem or None, key path, YAML value)."""
    target, sep, rest = text.partition(":") if ":" in text.split("=", 1)[0] else (None, "", text)
    key, eq, raw = rest.partition("=")
    path = key.strip().split(".")
    if not eq or not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in path):
        raise RecipeError(
            f"override {text!r}: expected [RECIPE:]dotted.key=value, e.g. training.learning_rate=1e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return target, path, value


def _apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {text!r}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_recipe(path: str | Path, overrides: list[tuple[list[str], Any, str]] = ()) -> BaseRecipe:
    """Read, override and validate a recipe; every failure is a one-line RecipeError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    from_override: dict[tuple, str] = {}
    for key_path, value, raw in overrides:
        _apply_override(data, key_path, value, raw)
        from_override[tuple(key_path)] = raw

    stage = data.get("stage")
    if stage not in RECIPE_CLASSES:
        got = "missing required key" if stage is None else f"got {stage!r}"
        raise RecipeError(f"{path}: stage: {got}; expected one of {', '.join(RECIPE_CLASSES)}")
    cls = RECIPE_CLASSES[stage]
    try:
        recipe = cls.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        loc, message = _describe(errors[0], cls)
        dotted = "".join(f"{p}: " for p in [".".join(str(p) for p in loc)] if p)
        source = next((f"override {raw!r}" for k, raw in from_override.items() if k == loc[: len(k)]), None)
        if source is None:
            lines = _line_index(text)
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            source = f"{path}:{line}" if line else str(path)
        else:
            source = f"{path} ({source})"
        more = len(exc.errors()) - 1
        raise RecipeError(f"{source}: {dotted}{message}" + (f" (+{more} more)" if more else "")) from None
    recipe._path = path
    return recipe


def model_inputs(recipe: BaseRecipe) -> dict[str, "str | FromRecipe"]:
    """The recipe's model-valued keys (`model`, and later `ref_model`, `reward_model`...)."""
    found = {}
    for role, info in type(recipe).model_fields.items():
        value = getattr(recipe, role)
        if value is not None and "FromRecipe" in str(info.annotation):
            found[role] = value
    return found


def resolved_dict(recipe: BaseRecipe) -> dict:
    """Every key with its value after defaults and overrides (the launcher line dropped)."""
    return recipe.model_dump(mode="json", by_alias=True, exclude={"launcher"})


def content_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

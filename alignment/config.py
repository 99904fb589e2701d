"""Recipe schema.

A recipe is a plain YAML file. Its schema is typed and strict: every key is declared
below with its default and help text, an unknown key is an error naming the file, the
dotted path and the closest valid key, and a wrong type names the type expected.
Defaults live here and nowhere else. Reading a recipe file (YAML, overrides, the one-line
errors) is alignment/recipe_file.py; a recipe's content hash is the pipeline's.

Launcher settings (number of processes, DeepSpeed, FSDP) do not belong in a recipe:
they live in ``recipes/accelerate/*.yaml`` and go to ``accelerate launch --config_file``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
    model_validator,
)

from .errors import RecipeError
from .estimators import ADVANTAGE, KL
from .paths import user_path
from .user_functions import is_reference, reference_file

STAGES = ("init", "pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "kto", "prep", "compare")


class Section(BaseModel):
    # allow_inf_nan=False: .inf or .nan in any number (a learning rate, a beta) is an error, not a NaN model
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    PATHS: ClassVar[tuple[str, ...]] = ()  # fields holding a local path (or a mapping of them): `~` is expanded

    @field_validator("*")
    @classmethod
    def _expand_home(cls, value, info):
        if info.field_name not in cls.PATHS:
            return value
        try:
            if isinstance(value, dict):
                return {k: user_path(v) if isinstance(v, str) else v for k, v in value.items()}
            return user_path(value) if isinstance(value, str) else value
        except RecipeError as exc:  # pydantic names the key of a ValueError
            raise ValueError(str(exc)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic's lax mode reads `true` as 1 for an int or float field; a recipe never means that.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, int | None):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, bool) and annotation in (float, float | None):
            raise ValueError(f"expected a number, got {value!r}")
        return value


def did_you_mean(value: str, valid) -> str:
    """'expected one of a, b, c' with the closest valid value first when there is one."""
    valid = list(valid)
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}expected one of {', '.join(valid)}"


# --------------------------------------------------------------------------- sections


class FromRecipe(Section):
    """Reference to another recipe: its output (built first if needed) is used here."""

    PATHS = ("from_",)
    from_: str = Field(alias="from", description="Path of the recipe whose output to use.")


ModelRef = Union[str, FromRecipe]


def template_problem(template) -> str | None:
    """Why a chat template (its text, or a mapping of named templates) does not compile, as
    `apply_chat_template` compiles it (transformers' own sandboxed jinja2 environment, with its
    `{% generation %}` tag); None when it compiles. Checked where a template is loaded, so that a
    syntax error is named there rather than at the first conversation it cannot render."""
    import jinja2

    try:  # transformers' private compiler (it knows `{% generation %}`, plain jinja2 does not); pinned by
        # tests/test_models.py::test_the_private_template_compiler_the_check_uses_is_there
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # the helper moved: leave the check to the first render
        return None
    texts = template.items() if isinstance(template, dict) else [(None, template)]
    for name, text in texts:
        if not isinstance(text, str):
            continue
        try:
            compile_template(text)
        except jinja2.TemplateSyntaxError as exc:
            which = f"the template named '{name}' " if name else ""
            return f"{which}does not compile, Jinja syntax error on line {exc.lineno}: {' '.join(str(exc.message).split())}"
    return None


class ModelOptions(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in ('auto': the checkpoint's own)."
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel ('sdpa', 'eager', 'flash_attention_2'); null: transformers' default."
    )
    trust_remote_code: bool = Field(False, description="Allow checkpoints that ship their own Python code.")
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit hash) at which every model and tokenizer named by a hub "
        "id is loaded; local directories ignore it. It enters the content hash with the id: pin a commit hash so "
        "that a cached stage is reused only for the same upstream weights (a branch name is hashed as a name, "
        "so an upstream update behind it is not seen). Null: the hub's default branch.",
    )

    PATHS = ("chat_template",)

    @field_validator("chat_template")
    @classmethod
    def _template_file_exists(cls, template):
        if not template:
            return template
        text = template
        if "\n" not in template and template.endswith(".jinja"):
            path = Path(user_path(template))
            if not path.is_file():
                raise ValueError(f"'{template}': no such file (a value ending in .jinja is a template file to read)")
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"'{template}': not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                    "save the template file as UTF-8"
                ) from None
            except OSError as exc:
                raise ValueError(f"'{template}': cannot be read ({exc.strerror or exc})") from None
        problem = template_problem(text)
        if problem:
            raise ValueError(f"'{template}': the chat template {problem}" if text is not template
                             else f"the chat template text {problem}")
        return template

    @field_validator("attn_implementation")
    @classmethod
    def _known_and_installed(cls, name, info):
        if name is not None and _check_software(info):
            problem = attention_problem(name)
            if problem:
                raise ValueError(problem)
        return name
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
        "all-linear", min_length=1, description="Module names to adapt (at least one), or 'all-linear'."
    )
    merge_on_save: bool = Field(
        True, description="Save merged full weights (loadable without peft) instead of the adapter alone."
    )


class DataOptions(Section):
    PATHS = ("source",)
    source: Union[str, FromRecipe] = Field(
        "demo",
        description="'demo' (the synthetic demo world), a .jsonl/.jsonl.gz/.json/.csv/.parquet file, a directory "
        "saved with datasets' save_to_disk or written by data_prep, a hub dataset id ('id' or 'id:config'), or "
        "{from: prep_recipe.yaml}: the output of a `prep` stage (built first).",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict.")
    num_examples: int | None = Field(
        None, gt=0, description="Rows to generate (demo: init.tokenizer_examples when null) or to keep (first N of a "
        "file). Null: all of a file."
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
    system_message: Literal["merge", "drop", "refuse"] = Field(
        "merge",
        description="What the data check does with a conversation whose system turn the model's chat template "
        "refuses (Gemma-2, Mistral-Instruct): 'merge' its text into the next user turn (separated by a blank "
        "line), 'drop' it, or 'refuse' (the row is bad, see on_bad_row). Found by rendering each row before "
        "anything trains; a template that accepts system turns keeps them. Changed rows are counted in the "
        "stage summary.",
    )

    @model_validator(mode="after")
    def _demo_rows(self):
        """A stage's default num_examples is the number of demo rows it generates: a file or a prep output
        is read whole unless the recipe sets num_examples, and demo with null generates the default."""
        if self.source != "demo" and "num_examples" not in self.model_fields_set:
            self.num_examples = None
        elif self.source == "demo" and self.num_examples is None:
            self.num_examples = type(self).model_fields["num_examples"].default
        return self


def _num_examples(default: int, rows: str) -> Any:
    """The num_examples field of a stage whose demo data has `default` rows."""
    return Field(
        default, gt=0, description=f"{rows.capitalize()} to generate (demo) or to keep (first N of a file). A file "
        f"or a prep output is read whole unless this is set; null: all of a file, {default} demo {rows}.",
    )


class PretrainDataOptions(DataOptions):
    """Data of the pretrain stage: raw text rows."""

    num_examples: int | None = _num_examples(20000, "documents")


class SFTDataOptions(DataOptions):
    """Data of the sft stage: conversations."""

    num_examples: int | None = _num_examples(4000, "conversations")


class PreferenceDataOptions(DataOptions):
    """Data of the preference stages (reward, dpo): prompt / chosen / rejected rows."""

    num_examples: int | None = _num_examples(4000, "pairs")

    eval_examples: int = Field(
        200,
        ge=0,
        description="About this many pairs are held out for held-out metrics and never trained on: whole prompts "
        "(all pairs sharing a prompt, compared after whitespace and case folding) are taken in the order of a "
        "fixed hash of the prompt until the next one would exceed the number, so no prompt is on both sides and "
        "the choice does not depend on row order. The summary's eval_pairs counts what is left after the "
        "trainer's length filter. 0: no held-out metrics. A `prep` output ({from: prep.yaml} or its directory) "
        "brings its own held-out split (test.jsonl), which is used instead.",
    )
    margin_field: str = Field(
        "margin",
        description="Column with a per-pair reward margin m, used when the data has it (reward): the model is "
        "asked for s_chosen - s_rejected > m.",
    )


class TrainingOptions(Section):
    """Passed to transformers' TrainingArguments under the same names."""

    learning_rate: float = Field(
        2e-5, gt=0, description="Peak learning rate (a full fine-tune of a 0.5-8B checkpoint; TRL's SFT default)."
    )
    per_device_train_batch_size: int = Field(8, gt=0, description="Batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: run num_train_epochs.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name (transformers.SchedulerType).")
    warmup_steps: float = Field(0.0, ge=0, description="Warm-up steps (a value below 1 is a fraction of training).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(
        1024, gt=1, description="Sequence length (pretrain: the block size); longer rows are dropped and counted "
        "(reward, dpo, kto) or cut (sft)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on a GPU that supports it, full precision otherwise."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N steps.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps for resuming (0: never).")
    report_to: list[str] = Field(
        default_factory=list,
        description="Trackers ('tensorboard', 'wandb', 'mlflow', ...; installed separately); metrics.jsonl is always "
        "written. TensorBoard files go to <output>/logs/.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("report_to")
    @classmethod
    def _installed_trackers(cls, names, info):
        if not _check_software(info):
            return names
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

        known = [n for n in LOGGER_TYPE_TO_CLASS if n in INTEGRATION_TO_CALLBACK]  # both trainers and ppo write to these
        installed = get_available_reporting_integrations()
        for name in names:
            if name not in known:
                raise ValueError(f"unknown tracker {name!r}; {did_you_mean(name, known)}")
            if name not in installed:
                raise ValueError(f"tracker {name!r} is not installed here (pip install {name})")
        return names

    @field_validator("max_steps")
    @classmethod
    def _positive_or_minus_one(cls, steps):
        if steps == 0 or steps < -1:
            raise ValueError(f"expected a positive number of steps, or -1 to run num_train_epochs; got {steps}")
        return steps

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, name, info):
        if not _check_software(info):
            return name
        from transformers.trainer_utils import SchedulerType

        valid = [s.value for s in SchedulerType]
        if name not in valid:
            raise ValueError(f"unknown scheduler {name!r}; {did_you_mean(name, valid)}")
        return name


def _check_software(info: ValidationInfo) -> bool:
    return (info.context or {}).get("check_software", True)


def attention_problem(name: str) -> str | None:
    """Why `model_options.attn_implementation: name` cannot work here, or None.

    Known names are transformers' attention kernels (plus 'org/repo' kernels from the hub, which
    need the `kernels` package); the flash and flex kernels need their packages installed.
    """
    from transformers import utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    needs = {
        "flash_attention_2": (utils.is_flash_attn_2_available, "the flash-attn package and a CUDA GPU"),
        "flash_attention_3": (utils.is_flash_attn_3_available, "the flash-attn 3 package and a Hopper GPU"),
        "flash_attention_4": (utils.is_flash_attn_4_available, "the flash-attn 4 package and a recent GPU"),
        "flex_attention": (utils.is_torch_flex_attn_available, "a torch build with flex attention"),
    }
    if "/" in name:  # a kernel from the hub, e.g. kernels-community/flash-attn
        available, what = utils.is_kernels_available, "the kernels package (pip install kernels)"
    elif name.removeprefix("paged|") in known:
        available, what = needs.get(name.removeprefix("paged|"), (lambda: True, ""))
    else:
        return f"unknown attention implementation {name!r}; {did_you_mean(name, known)}"
    if not available():
        return f"{name!r} is not available here: it needs {what}; use 'sdpa' (or null) instead"
    return None


class InitOptions(Section):
    """Shape of the tiny base checkpoint built by the `init` stage."""

    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size (special tokens included).")
    hidden_size: int = Field(256, gt=0, description="Model width.")
    intermediate_size: int = Field(512, gt=0, description="MLP width.")
    num_hidden_layers: int = Field(2, gt=0, description="Transformer blocks.")
    num_attention_heads: int = Field(8, gt=0, description="Attention heads.")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence the model accepts.")
    tokenizer_examples: int = Field(4000, gt=0, description="Corpus documents the tokenizer is trained on.")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class GenerationOptions(Section):
    """How compared models answer: the same rule and the same seed for every model."""

    max_new_tokens: int = Field(512, gt=0, description="Longest reply, in tokens.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 1.0 shows each model's whole distribution, 0 is greedy."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (1: off); ignored when greedy.")
    samples_per_prompt: int = Field(1, gt=0, description="Replies sampled per prompt and model (needs temperature > 0 above 1).")
    seed: int = Field(0, description="Seed of the sampling (the same for every model) and of the bootstrap.")
    batch_size: int = Field(64, gt=0, description="Prompts generated (and scored) at once.")

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError("samples_per_prompt > 1 needs temperature > 0 (greedy replies are all the same)")
        return self


class ReportOptions(Section):
    """The closing report: models answer held-out demo prompts and the gold oracle grades them.

    It is `alignment compare` on the demo prompts: the same summary, table, report.md/json/html."""

    PATHS = ("models",)

    models: dict[str, str] = Field(
        default_factory=dict,
        description="Label -> recipe name in this run (or a model directory), in table order; each model is "
        "compared with the one before it. Empty: no report.",
    )
    baseline: str | None = Field(
        None,
        description="Label KL and win rates are measured against (the reference, e.g. 'sft'). Null: the label "
        "before the last one in `models` (the model the last stage started from, in the usual order).",
    )
    num_prompts: int = Field(300, gt=1, description="Held-out demo prompts to answer.")
    max_new_tokens: int = Field(24, gt=0, description="Longest reply.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 1.0 shows each model's whole distribution, 0 is greedy."
    )
    also_greedy: bool = Field(
        True,
        description="Also answer greedily and print the per-part gold table under greedy decoding (when "
        "`temperature` is above 0): what each model does at its most likely, beside its whole distribution.",
    )
    seed: int = Field(0, description="Seed of the prompts, the sampling and the bootstrap.")
    batch_size: int = Field(64, gt=0, description="Prompts generated at once.")

    @model_validator(mode="after")
    def _baseline_is_a_label(self):
        if self.models and self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"baseline {self.baseline!r} is not a label of report.models ({', '.join(self.models)})")
        return self


# --------------------------------------------------------------------------- recipes


class BaseRecipe(Section):
    PATHS = ("output_dir", "model", "ref_model", "reward_model", "models")
    # Keys the stage never reads (dotted): setting one is an error rather than a silent no-op.
    UNREAD: ClassVar[tuple[str, ...]] = ()
    launcher: str | None = Field(
        None, description="The line that lets `accelerate launch RECIPE.yaml` run the file; ignored here."
    )
    _path: Path | None = PrivateAttr(None)

    stage: str
    output_dir: str | None = Field(None, description="Where the stage writes its model. Null: runs/<recipe name>.")
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    world: str = Field(
        "default",
        description="Preset of the demo world wherever this stage makes demo data (init's tokenizer corpus, the "
        "pretrain corpus, SFT conversations, preference pairs, RL training prompts, the closing report's and "
        "compare's held-out prompts, prep's demo sources): 'default' (the documented figures) or 'hard' "
        "(a fifth of the demonstrations wrong, subtler and partly flipped preference pairs: SFT leaves headroom). "
        "Switch a whole chain with the override '*:world=hard' (docs/demo_world.md).",
    )
    model: ModelRef | None = Field(
        None, description="Starting checkpoint: a local path, a hub id, or {from: other_recipe.yaml}."
    )
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of all weights.")
    data: DataOptions = Field(default_factory=DataOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    report: ReportOptions = Field(default_factory=ReportOptions)

    @field_validator("world")
    @classmethod
    def _a_preset(cls, value):
        from .demo.world import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown world {value!r}; {did_you_mean(value, PRESETS)}")
        return value

    @field_validator("output_dir")
    @classmethod
    def _a_directory(cls, value):
        if value is not None and not value.strip():
            raise ValueError(f"expected a directory path, got {value!r} (null, or no key: runs/<recipe name>)")
        return value

    @model_validator(mode="after")
    def _needs_model(self):
        if self.stage != "init" and self.model is None:
            raise ValueError("missing required key 'model' (a path, a hub id or {from: recipe.yaml})")
        return self


_FIELDS = ("data.text_field", "data.messages_field", "data.prompt_field", "data.chosen_field", "data.rejected_field")


def _unread_fields(*read: str) -> tuple[str, ...]:
    """The data.*_field keys but those the stage reads."""
    return tuple(f for f in _FIELDS if f.removeprefix("data.") not in read)


class InitRecipe(BaseRecipe):
    UNREAD = ("model", "lora", "training", *_unread_fields("text_field"))
    stage: Literal["init"]
    init: InitOptions = Field(default_factory=InitOptions)


class PretrainRecipe(BaseRecipe):
    UNREAD = _unread_fields("text_field")
    stage: Literal["pretrain"]
    data: PretrainDataOptions = Field(default_factory=PretrainDataOptions)


class SFTOptions(Section):
    """Supervised fine-tuning on conversations (TRL's SFTTrainer), loss on assistant tokens only."""

    packing: bool = Field(
        False,
        description="Pack whole conversations into rows of training.max_length tokens (TRL's best-fit decreasing "
        "packing; a longer conversation is cut to max_length) and train padding-free: no pad tokens, each "
        "conversation keeps its own positions and attends to itself only (FlashAttention's variable-length kernels, "
        "or the block-diagonal mask transformers builds from the positions for sdpa and eager). The loss stays on "
        "assistant tokens; per_device_train_batch_size then counts rows of max_length tokens.",
    )


class SFTRecipe(BaseRecipe):
    UNREAD = _unread_fields("messages_field")
    stage: Literal["sft"]
    data: SFTDataOptions = Field(default_factory=SFTDataOptions)
    sft: SFTOptions = Field(default_factory=SFTOptions)


class RewardOptions(Section):
    """Bradley-Terry reward model: loss = -log sigma(s_c - s_r - m) + center_coef (s_c + s_r)^2."""

    center_coef: float = Field(
        0.0, ge=0.0, description="Weight of the (s_chosen + s_rejected)^2 term that keeps rewards centred on 0 (0: off)."
    )


class RewardRecipe(BaseRecipe):
    UNREAD = _unread_fields("prompt_field", "chosen_field", "rejected_field")
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


class PolicyTrainingOptions(TrainingOptions):
    """Passed to transformers' TrainingArguments under the same names (the RL stages read the learning rate,
    schedule, warm-up, weight decay, clipping and accumulation). A policy trained against a reference
    (dpo, kto, ppo, grpo, rloo) moves at a lower learning rate than SFT (TRL's DPO, GRPO and RLOO default)."""

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (a full fine-tune of a 0.5-8B policy).")


class DPORecipe(BaseRecipe):
    UNREAD = (*_unread_fields("prompt_field", "chosen_field", "rejected_field"), "data.margin_field")
    stage: Literal["dpo"]
    ref_model: ModelRef | None = Field(
        None,
        description="Reference policy: a local path, a hub id or {from: recipe.yaml}. Null: the starting model "
        "(`model`), the usual choice.",
    )
    data: PreferenceDataOptions = Field(default_factory=PreferenceDataOptions)
    training: PolicyTrainingOptions = Field(default_factory=PolicyTrainingOptions)
    dpo: DPOOptions = Field(default_factory=DPOOptions)

    @model_validator(mode="after")
    def _simpo_has_no_reference(self):
        if self.dpo.loss_type == "simpo" and self.ref_model is not None:
            raise ValueError("ref_model is set but loss_type 'simpo' is reference-free; remove one of them")
        return self


class FeedbackDataOptions(PreferenceDataOptions):
    """Data of the kto stage: unpaired feedback rows (prompt / completion / label), or pairs, each of which
    becomes one desirable and one undesirable row."""

    completion_field: str = Field("completion", description="Column holding the assistant reply that was judged (kto).")
    label_field: str = Field(
        "label",
        description="Column holding the judgement (kto): true/false, 1/0, or a word (up/down, thumbs_up/thumbs_down, "
        "accept/reject, good/bad, desirable/undesirable). Ratings: turn them into labels with `python -m data_prep "
        "binary --threshold` or a `prep` stage (prep.kind: binary).",
    )


class KTOOptions(Section):
    """Kahneman-Tversky optimisation on unpaired desirable/undesirable replies (TRL's KTOTrainer; names as TRL's)."""

    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto",
        description="'kto': the KTO loss (Ethayarajh et al. 2024), with the batch's KL estimate as reference point; "
        "'apo_zero_unpaired': the unpaired APO-zero loss (no KL term).",
    )
    beta: float = Field(0.1, gt=0.0, description="Strength of the implicit KL leash to the reference.")
    desirable_weight: float | Literal["auto"] = Field(
        1.0,
        description="Weight of the desirable rows' losses (> 0). The KTO paper recommends desirable_weight * "
        "n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]; the stage says so, with the numbers, when "
        "it is not. 'auto': the weight that puts this ratio in the middle of that range (7/6), from the training "
        "rows' counts, so that feedback whose balance varies (new samples, another seed) stays weighted as the "
        "paper recommends; the summary records the weight used.",
    )
    undesirable_weight: float = Field(1.0, gt=0.0, description="Weight of the undesirable rows' losses.")

    @field_validator("desirable_weight")
    @classmethod
    def _positive_weight(cls, value):
        if value != "auto" and not value > 0:
            raise ValueError(f"{value}: expected a number > 0, or 'auto'")
        return value

    reference: Literal["copy", "precompute"] = Field(
        "copy",
        description="'copy': a frozen reference model runs beside the policy; 'precompute': reference log-probs are "
        "computed once before training. With LoRA (and ref_model the starting model) the reference is the policy "
        "with its adapters disabled.",
    )
    precompute_batch_size: int | None = Field(
        None, gt=0, description="Batch size of the reference pass of 'precompute'. Null: the training batch size."
    )


class KTORecipe(BaseRecipe):
    UNREAD = (*_unread_fields("prompt_field", "chosen_field", "rejected_field"), "data.margin_field")
    stage: Literal["kto"]
    ref_model: ModelRef | None = Field(
        None, description="Reference policy: a local path, a hub id or {from: recipe.yaml}. Null: the starting model."
    )
    data: FeedbackDataOptions = Field(default_factory=FeedbackDataOptions)
    training: PolicyTrainingOptions = Field(default_factory=PolicyTrainingOptions)
    kto: KTOOptions = Field(default_factory=KTOOptions)

    @model_validator(mode="after")
    def _kl_needs_a_batch(self):
        if self.kto.loss_type == "kto" and self.training.per_device_train_batch_size < 2:
            raise ValueError("training.per_device_train_batch_size: the kto loss estimates its KL reference point from "
                             "the other rows of a batch; set it to 2 or more")
        return self


BUILTIN_REWARDS = ("gold",)  # reward_fn names that are not 'file.py:function' / 'module:function'


def _one_or_many(value):
    return [value] if isinstance(value, str) else value


def check_function_refs(refs: list[str]) -> list[str]:
    twice = sorted({ref for ref in refs if refs.count(ref) > 1})
    if twice:
        raise ValueError(
            f"{twice[0]!r} is listed more than once; list it once and give it the sum of its weights in "
            "reward_weights"
        )
    for ref in refs:
        if ref not in BUILTIN_REWARDS and not is_reference(ref):
            raise ValueError(
                f"{ref!r} is not a reward function: expected 'file.py:name', 'package.module:name' or one of "
                f"{', '.join(BUILTIN_REWARDS)}"
            )
    return refs


# `reward_fn` wherever a recipe takes Python reward functions (the RL stages, online_dpo, prep): one
# string or a list, each named once, each 'file.py:name', 'package.module:name' or a built-in.
RewardFunctions = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(check_function_refs)]


def check_reward_weights(has_model: bool, reward_fn: list[str], weights: list[float] | None) -> None:
    """`reward_weights` gives one weight per reward source: reward_model first when set, then each reward_fn."""
    count = has_model + len(reward_fn)
    if weights is not None and len(weights) != count:
        raise ValueError(
            f"reward_weights has {len(weights)} entries for {count} reward sources "
            "(reward_model first when set, then each reward_fn)"
        )


def check_scorers(recipe, scorers: list[str], key: str) -> None:
    """The reward sources that `key` (online.scorer, samples.scorer), set to each of `scorers`, reads are
    set, and reward_fn / reward_weights are not set unread. 'reward_fn' sums the functions and, when it
    is set, the reward model, as the RL stages sum their sources."""
    if "reward_model" in scorers and recipe.reward_model is None:
        raise ValueError(f"{key} 'reward_model' needs 'reward_model' (a path or {{from: reward.yaml}})")
    if "reward_fn" in scorers and not recipe.reward_fn:
        raise ValueError(f"{key} 'reward_fn' needs 'reward_fn' (Python functions, 'file.py:name' or "
                         "'package.module:name', or 'gold')")
    if "reward_fn" not in scorers and (recipe.reward_fn or recipe.reward_weights is not None):
        which = "reward_fn" if recipe.reward_fn else "reward_weights"
        raise ValueError(f"{which} is set but no {key} is 'reward_fn': set {key}: reward_fn to score with the "
                         "functions, or remove it")
    check_reward_weights(recipe.reward_model is not None, recipe.reward_fn, recipe.reward_weights)


SCORER_HELP = (
    "'oracle': the demo world's gold score (demo prompts only); 'reward_model': the recipe's `reward_model`; "
    "'reward_fn': the recipe's `reward_fn` functions (and `reward_model` too when it is set), summed with "
    "`reward_weights` as the RL stages sum their reward sources."
)
SAMPLED_REWARD_FN_HELP = (
    "Python reward functions that score the sampled replies ({key}: reward_fn), as the RL stages' "
    "`reward_fn`: 'file.py:name' or 'package.module:name', called once per batch of replies as name(prompts=..., "
    "completions=..., **columns) -> list of floats (None: not applicable), where columns are the prompt "
    "file's other fields (TRL's GRPO reward functions work unchanged); 'gold': the demo world's gold oracle. "
    "A single string is one function. A file's bytes are part of the content hash."
)
REWARD_WEIGHTS_HELP = (
    "Weight of each reward source in the sum, in order: reward_model (when set), then each reward_fn. Null: all 1."
)


class OnlineOptions(Section):
    """Iterative online DPO: each round samples k replies per prompt from the current policy, scores them, keeps
    best vs worst and trains DPO on those pairs (alignment/rounds.py)."""

    k: int = Field(4, ge=2, description="Replies sampled per prompt each round.")
    prompts_per_round: int = Field(
        256, gt=0, description="Prompts answered each round: the first N of data.source, or N demo-world training "
        "prompts drawn with a seed of the round's own (seed + round), so each round sees other prompts."
    )
    scorer: Literal["oracle", "reward_model", "reward_fn"] = Field("oracle", description=SCORER_HELP)
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (1: off).")
    max_new_tokens: int = Field(32, gt=0, description="Longest sampled reply, in tokens.")
    batch_size: int = Field(64, gt=0, description="Prompts generated at once.")
    min_margin: float = Field(
        0.0, ge=0.0, description="Best must beat worst by at least this; prompts whose samples tie or fall short "
        "are dropped and counted."
    )
    test_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of each round's prompts held out (by prompt hash) for DPO's "
        "held-out metrics."
    )
    reference: Literal["previous", "start"] = Field(
        "previous",
        description="DPO reference of round r: 'previous': the model round r starts from (round r-1's output); "
        "'start': the recipe's starting model (`model`, e.g. SFT) in every round.",
    )


class OnlineDPORecipe(BaseRecipe):
    """Stage `online_dpo`: `rounds` rounds, each a prep stage (sample, score, best vs worst) and a dpo stage,
    each an ordinary cached stage output under output_dir (round-1-pairs/, round-1/, ...)."""

    UNREAD = (*_unread_fields("prompt_field"), "data.num_examples", "data.split", "data.on_bad_row")
    stage: Literal["online_dpo"]
    rounds: int = Field(2, ge=1, description="Rounds of sample -> score -> pairs -> DPO; adding one trains only it.")
    reward_model: ModelRef | None = Field(
        None, description="Scores the samples (online.scorer: reward_model, or reward_fn beside the functions): a "
        "path or {from: reward.yaml}."
    )
    reward_fn: RewardFunctions = Field(
        default_factory=list, description=SAMPLED_REWARD_FN_HELP.format(key="online.scorer")
    )
    reward_weights: list[float] | None = Field(None, description=REWARD_WEIGHTS_HELP)
    online: OnlineOptions = Field(default_factory=OnlineOptions)
    dpo: DPOOptions = Field(default_factory=DPOOptions)

    @model_validator(mode="after")
    def _sources(self):
        if not isinstance(self.data.source, str):
            raise ValueError("data.source: online_dpo reads prompts from 'demo' or a file of prompts, not a prep output")
        check_scorers(self, [self.online.scorer], "online.scorer")
        return self


# --------------------------------------------------------------------------- prep (data_prep)

SHAPES = ("explicit", "implicit", "rated", "scored", "ranked", "binary", "sft", "text")


class PrepColumns(Section):
    """Column names in the source rows; the defaults are the common ones. Which are read depends on the shape."""

    prompt: str = Field("prompt", description="Prompt: text, a transcript, or chat messages (explicit, rated, scored, ranked).")
    chosen: str = Field("chosen", description="Preferred reply, or whole transcript / conversation (implicit).")
    rejected: str = Field("rejected", description="Dispreferred reply, or whole transcript / conversation (implicit).")
    completions: str = Field("completions", description="Rated: list of responses (text, or objects with response_key/rating_key).")
    ratings: str = Field("ratings", description="Rated: list of numbers, one per completion (when completions are text).")
    response_key: str = Field("response", description="Rated: key of the response inside a completion object.")
    rating_key: str = Field("rating", description="Rated: key of the rating inside a completion object.")
    response_a: str = Field("response_a", description="Scored: first response.")
    response_b: str = Field("response_b", description="Scored: second response.")
    score_a: str = Field("score_a", description="Scored: score of the first response (e.g. upvotes).")
    score_b: str = Field("score_b", description="Scored: score of the second response.")
    ranked: str = Field("ranked", description="Ranked: list of responses, best first.")
    completion: str = Field("completion", description="Binary: the judged reply.")
    label: str = Field(
        "label", description="Binary: the judgement (true/false, 1/0, up/down, accept/reject, ...), or a rating "
        "compared with `threshold`."
    )
    messages: str = Field("messages", description="SFT: chat messages (or a Human/Assistant transcript).")
    text: str = Field("text", description="Raw text (pretrain).")
    id: str = Field("id", description="Row id kept in the output when present (else a content hash).")


class PrepSamples(Section):
    """Replies sampled from the prep recipe's `model` for a source's prompts, and how they are scored."""

    k: int = Field(4, ge=1, description="Replies sampled per prompt.")
    scorer: Literal["oracle", "reward_model", "reward_fn"] = Field("oracle", description=SCORER_HELP)
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (1: off).")
    max_new_tokens: int = Field(512, gt=0, description="Longest sampled reply, in tokens.")
    batch_size: int = Field(64, gt=0, description="Prompts generated at once.")


class PrepSource(Section):
    """One input of `prep`: where the rows are, their shape and their weight in the mix."""

    PATHS = ("path",)

    path: str = Field(
        description="'demo' (the demo world's pairs, conversations or text), a .jsonl/.jsonl.gz/.json/.csv/.parquet "
        "file, a save_to_disk directory, or a hub dataset id ('id' or 'id:config')."
    )
    shape: Literal["auto", "explicit", "implicit", "rated", "scored", "ranked", "binary", "sft", "text"] = Field(
        "auto", description="Row shape; 'auto' detects it from the columns and is an error when several match."
    )
    name: str | None = Field(None, description="Label written in the `source` column. Null: the file name.")
    weight: float = Field(
        1.0,
        gt=0.0,
        description="Sampling rate in the mix: 0.5 keeps a (fixed, hash-chosen) half of this source's rows, 2 "
        "writes each row twice, 1.5 half of them twice. Rows left out are counted as 'not sampled (weight)'.",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict.")
    num_examples: int | None = Field(None, gt=0, description="Read only the first N rows (demo: rows generated). Null: all.")
    columns: PrepColumns = Field(default_factory=PrepColumns)
    samples: PrepSamples | None = Field(
        None,
        description="On-policy data (prep stage): the source's rows are prompts (demo: the demo world's training "
        "prompts); the recipe's `model` answers each samples.k times and the replies are scored, making rated rows: "
        "best vs worst for kind pairs, one labelled row per reply (by threshold) for kind binary.",
    )

    @model_validator(mode="after")
    def _samples_are_rated(self):
        if self.samples is not None and self.shape not in ("auto", "rated"):
            raise ValueError(f"shape '{self.shape}' and samples conflict: sampled replies are rated rows (shape auto or rated)")
        return self


class PrepOptions(Section):
    """What `python -m data_prep` and the `prep` stage do (the command-line flags have the same names)."""

    kind: Literal["pairs", "binary", "sft", "text"] = Field(
        "pairs",
        description="'pairs': preference pairs (reward, dpo); 'binary': unpaired prompt/completion/label rows (kto), "
        "from feedback rows, rated lists (by `threshold`) or pairs (each one desirable + one undesirable row); "
        "'sft': conversations; 'text': raw text (pretrain).",
    )
    sources: list[PrepSource] = Field(
        default_factory=lambda: [PrepSource(path="demo")], min_length=1, description="Inputs, mixed in this order."
    )
    test_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of prompts held out in test.*: a fixed hash of the normalised prompt decides, so a "
        "prompt (and every pair that has it) is on one side only, whatever the row order. 0: no test split.",
    )
    split_seed: int = Field(0, description="Salt of the split hash: another seed, another (equally fixed) split.")
    dedup: Literal["none", "exact", "normalised"] = Field(
        "normalised",
        description="'exact': drop rows identical to an earlier one; 'normalised': also those equal after Unicode "
        "NFKC, case folding and whitespace collapsing. The first occurrence is kept.",
    )
    max_turns: int | None = Field(None, gt=0, description="Drop rows whose prompt (sft: conversation) has more user turns.")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Drop pairs whose prompt has more tokens (needs `model`).")
    max_length: int | None = Field(
        None,
        gt=0,
        description="Drop rows longer than this many tokens: prompt + the longer reply (sft, text: the whole row). "
        "Counts message contents with the tokenizer of `model`, without the chat template's few tokens per turn.",
    )
    rejected_choice: Literal["worst", "random"] = Field(
        "worst", description="Rated completions: the best is chosen; rejected is the worst or a random lower-rated one."
    )
    min_margin: float = Field(
        0.0, ge=0.0, description="Rated completions / on-policy: the chosen rating must exceed the rejected by at least this (ties are always dropped)."
    )
    min_ratio: float = Field(
        1.0, ge=1.0, description="Scored responses: keep a pair when the higher score is at least this multiple of the lower (2 is usual for upvotes; ties are always dropped)."
    )
    ranked_pairs: Literal["best-worst", "adjacent", "all"] = Field(
        "best-worst", description="Ranked lists: one pair (best vs worst), each neighbour pair, or every ordered pair."
    )
    threshold: float | None = Field(
        None,
        description="Binary: a numeric label (a rating) or a rated completion is desirable when it is at least this. "
        "Null: labels must be true/false, 1/0 or words (up/down, accept/reject, ...).",
    )
    keep_desirable: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Binary: keep this share of the desirable rows (a fixed, hash-chosen subset; the rest counted as "
        "'desirable not kept (keep_desirable)'), e.g. to make on-policy feedback as imbalanced as real feedback, "
        "where problems are reported more often than successes.",
    )
    strict: bool = Field(False, description="Any dropped row is an error naming its file and line.")
    seed: int = Field(0, description="Seed of the random rejected choice, of the weighted sampling and of demo sources.")

    @model_validator(mode="after")
    def _strict_drops_nothing(self):
        low = next((s for s in self.sources if s.weight < 1), None)
        if self.strict and low is not None:
            raise ValueError(f"strict (--strict) and a source weight below 1 ({low.weight:g}, --weights) conflict: "
                             "sampling by weight leaves rows out, and strict allows no dropped row")
        if self.strict and self.keep_desirable < 1:
            raise ValueError(f"strict (--strict) and keep_desirable {self.keep_desirable:g} (--keep-desirable) conflict: "
                             "it leaves desirable rows out, and strict allows no dropped row")
        return self


class PrepRecipe(BaseRecipe):
    """Stage `prep`: data preparation. Its output directory holds train/test JSONL and Parquet files and
    summary.json; a reward or dpo recipe reads it with `data.source: {from: prep.yaml}`."""

    UNREAD = ("lora", "training", "data")
    stage: Literal["prep"]
    model: ModelRef | None = Field(
        None,
        description="Tokenizer for prep.max_prompt_tokens / prep.max_length, and the policy that answers sources "
        "with `samples`: a path, a hub id or {from: recipe.yaml}. Null: no token limits, no sampling.",
    )
    reward_model: ModelRef | None = Field(
        None, description="Scores sampled replies (sources with samples.scorer: reward_model, or reward_fn beside the "
        "functions): a path or {from: reward.yaml}."
    )
    reward_fn: RewardFunctions = Field(
        default_factory=list, description=SAMPLED_REWARD_FN_HELP.format(key="samples.scorer")
    )
    reward_weights: list[float] | None = Field(None, description=REWARD_WEIGHTS_HELP)
    ref_model: ModelRef | None = Field(
        None, description="Sources with samples: also measure KL(model || ref_model) on the sampled replies (the "
        "mean over replies of their summed log-ratio; summary: samples/<source>/kl). Null: not measured.",
    )
    prep: PrepOptions = Field(default_factory=PrepOptions)

    @model_validator(mode="after")
    def _needs_model(self):  # replaces BaseRecipe's check: prep needs a model only for token limits and sampling
        if (self.prep.max_prompt_tokens or self.prep.max_length) and self.model is None:
            raise ValueError("prep.max_prompt_tokens / prep.max_length count tokens: set 'model' to a tokenizer")
        sampled = [s for s in self.prep.sources if s.samples is not None]
        if sampled and self.model is None:
            raise ValueError("prep.sources[].samples: replies are sampled from 'model': set it (e.g. {from: sft.yaml})")
        check_scorers(self, [s.samples.scorer for s in sampled], "samples.scorer")
        return self


# --------------------------------------------------------------------------- compare


DEMO_PROMPTS = 300  # held-out demo prompts a comparison answers when it names no number


class PromptOptions(Section):
    """The prompts compared models answer."""

    PATHS = ("source",)

    source: str = Field(
        "demo",
        description="'demo' (the demo world's held-out eval prompts, graded by its gold oracle), a .txt file "
        "(one prompt a line), a .jsonl/.json/.csv/.parquet file, a save_to_disk directory or a hub dataset id.",
    )
    field: str = Field("prompt", description="Column holding the user prompt (a plain string) in a data file.")
    split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict.")
    num_prompts: int | None = Field(
        DEMO_PROMPTS, gt=0, description="Prompts to use: how many demo prompts, or the first N of a file. Null: all "
        f"of a file ({DEMO_PROMPTS} demo prompts).",
    )
    seed: int = Field(0, description="Seed that picks the demo prompts.")


class CompareRecipe(BaseRecipe):
    """Stage `compare`: models answer the same prompts; scores, win rates, KL and a report."""

    UNREAD = ("model", "lora", "training", "data")
    stage: Literal["compare"]
    models: dict[str, ModelRef] = Field(
        default_factory=dict,
        description="Label -> model (a path, a hub id or {from: recipe.yaml}), at least two, in table order.",
    )
    baseline: str | None = Field(
        None, description="Label KL(model || baseline) and win rates are measured against. Null: the first model."
    )
    reward_model: ModelRef | None = Field(
        None, description="A one-label sequence classifier that scores every reply (optional)."
    )
    prompts: PromptOptions = Field(default_factory=PromptOptions)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)

    @model_validator(mode="after")
    def _needs_model(self):  # replaces BaseRecipe's: `models` instead of `model`
        if len(self.models) < 2:
            raise ValueError(f"models: need at least two models to compare, got {len(self.models)}")
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"baseline {self.baseline!r} is not a label of models ({', '.join(self.models)})")
        return self


# --------------------------------------------------------------------------- online RL: ppo, grpo, rloo


KL_ESTIMATORS = tuple(KL)  # the schema's names come from the registries (alignment/estimators.py)
ADVANTAGE_ESTIMATORS = tuple(ADVANTAGE)
KLEstimatorName = Literal[KL_ESTIMATORS]
KL_HELP = (
    "Per-token estimator of KL(policy || reference) on sampled tokens, log r = ref_logp - logp; what its "
    "expected gradient follows with the KL in the loss / in the reward: " + "; ".join(
        f"'{name}' = {e.fn.__doc__.split('=', 1)[1].strip().rstrip('.')} ({e.estimates}; loss: "
        f"{e.in_loss or 'expected gradient 0, refused'}; reward: {e.in_reward})"
        for name, e in KL.items()
    ) + "."
)


class RLOptions(Section):
    """What the one RL loop (alignment/stages/rl.py) reads in every RL stage: rollouts, the clipped
    policy update and the KL leash. The stage's own section (ppo, grpo, rloo) adds the rest."""

    total_episodes: int = Field(
        2048, gt=0, description="Rollouts (prompt + sampled reply) over the whole run; iterations = "
        "total_episodes // batch_size."
    )
    batch_size: int = Field(
        64, gt=0, description="Rollouts per iteration, over all processes (grpo, rloo: batch_size / "
        "num_generations prompts, num_generations replies each)."
    )
    num_minibatches: int = Field(
        1, gt=0, description="Minibatches each iteration's batch is split into; one optimizer step per minibatch "
        "(training.gradient_accumulation_steps micro-batches inside each)."
    )
    ppo_epochs: int = Field(4, gt=0, description="Passes over each iteration's rollouts.")
    response_length: int = Field(512, gt=0, description="Most new tokens per reply.")
    temperature: float = Field(
        0.7, gt=0.0, description="Sampling temperature of the rollouts; log-probs are taken at the same temperature."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the rollouts (1: off).")
    clip_range: float | None = Field(
        0.2, gt=0.0, description="Ratio clip epsilon of the policy loss (null: no clipping, the plain policy gradient)."
    )
    kl_estimator: KLEstimatorName = Field("k1", description=KL_HELP)
    kl_coef: float = Field(
        0.05, ge=0.0, description="KL coefficient beta (the starting value when adaptive). 0 with kl_control "
        "'fixed': no reference model is loaded at all."
    )
    kl_control: Literal["fixed", "adaptive"] = Field(
        "fixed", description="'adaptive': beta follows Ziegler et al.'s controller toward kl_target."
    )
    kl_target: float = Field(6.0, gt=0.0, description="(adaptive) target of the per-reply summed KL.")
    kl_horizon: int = Field(10000, gt=0, description="(adaptive) controller horizon in episodes.")
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the score of replies that end without EOS (null: none)."
    )
    forward_batch_size: int | None = Field(
        None, gt=0, description="Rows per no-grad forward pass during rollouts (null: the whole local batch); "
        "reward functions are still called once per batch."
    )
    soft_punish_cache: int = Field(
        0, ge=0, description="DAPO's overlong reward shaping (TRL's get_soft_overlong_punishment): a reply of more "
        "than response_length - soft_punish_cache tokens gets a penalty falling linearly from 0 to -1 at "
        "response_length, logged as rewards/overlong and added to the score (0: off)."
    )
    generation_gather: Literal["full", "layer"] = Field(
        "full", description="Rollouts from a policy sharded with FSDP2 (an FSDP launch; alignment/sharding.py): "
        "'full' gathers the whole policy once per rollout and decodes without communication (faster; each process "
        "then holds the policy's full weights while it samples), 'layer' gathers each layer as it runs at every "
        "decoding step (holds one layer at a time: for a policy whose weights do not fit one device). Unused "
        "without FSDP."
    )

    @model_validator(mode="after")
    def _batch_splits(self):
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}"
            )
        if self.total_episodes < self.batch_size:
            raise ValueError(f"total_episodes {self.total_episodes} is smaller than batch_size {self.batch_size}")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_generations {self.group_size}")
        if self.soft_punish_cache > self.response_length:
            raise ValueError(
                f"soft_punish_cache {self.soft_punish_cache} is longer than response_length {self.response_length}"
            )
        return self

    @model_validator(mode="after")
    def _kl_leash(self):
        beta = type(self).model_fields["kl_coef"].alias or "kl_coef"
        if self.kl_control == "adaptive" and self.kl_coef == 0:
            raise ValueError(
                f"kl_control 'adaptive' with {beta} 0 never moves (its update multiplies {beta}): start from a "
                f"positive {beta}, or use kl_control 'fixed'"
            )
        leash = self.kl_coef > 0 or self.kl_control == "adaptive"
        if leash and self.kl_in_loss and KL[self.kl_estimator].in_loss is None:
            in_loss = [name for name, e in KL.items() if e.in_loss is not None]
            raise ValueError(
                f"kl_estimator '{self.kl_estimator}' in the loss has expected gradient 0 and pulls nothing toward the "
                f"reference: use {' or '.join(repr(n) for n in in_loss)} (docs/rl.md says which KL each follows), or "
                "kl_in 'reward'"
            )
        return self

    @property
    def group_size(self) -> int:
        """Replies sampled per prompt (1: PPO)."""
        return 1

    @property
    def estimator(self) -> str:
        """The advantage estimator: 'gae' (PPO's, with a critic) or a critic-free one."""
        return "gae"

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def aggregation(self) -> str:
        """How per-token losses become one ('token': PPO's token mean; see CriticFreeOptions)."""
        return "token"

    @property
    def kl_in_loss(self) -> bool:
        """The KL leash is a loss term (GRPO) rather than a reward term (PPO, RLOO)."""
        return False

    @property
    def ratio_clip_high(self) -> float | None:
        """The upper ratio clip epsilon (None: the same as clip_range)."""
        return None

    @property
    def ratio_level(self) -> str:
        """'token' or 'sequence' (GSPO) importance ratios."""
        return "token"

    @property
    def drops_equal_groups(self) -> bool:
        """DAPO's dynamic sampling."""
        return False


class PPOOptions(RLOptions):
    """PPO with a KL penalty and a critic (see alignment/stages/rl.py for one iteration step by step)."""

    value_clip_range: float = Field(0.2, gt=0.0, description="Clip of the value update around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (mean kept) before GAE.")
    clip_range: float = Field(0.2, gt=0.0, description="PPO ratio clip epsilon.")


class CriticFreeOptions(RLOptions):
    """Online RL without a critic: several replies per prompt, each scored against its siblings."""

    num_generations: int = Field(
        4, ge=2, description="Replies sampled per prompt (G, RLOO's k); the group an advantage is measured in."
    )
    advantage_estimator: str = Field(
        "grpo",
        description="'grpo': (r - group mean) / group std (std only with scale_rewards); 'rloo': r - the mean of "
        "the other replies to the prompt; 'reinforce_baseline': r - group mean, then whitened over the batch "
        "(REINFORCE++-baseline); or your own, 'file.py:name' or 'package.module:name', called as "
        "name(scores, group_size, scale, whiten) -> one float per reply (docs/rl.md).",
    )
    scale_rewards: bool = Field(
        True, description="(grpo) Divide by the group's standard deviation (false: Dr. GRPO); (reinforce_baseline) "
        "whiten over the batch. Either way a KL in the reward keeps beta's scale: only the scores are rescaled."
    )
    kl_in: Literal["loss", "reward"] = Field(
        "loss",
        description="Where the KL leash acts: 'loss' adds beta * the per-token kl_estimator to the loss "
        "(GRPO); 'reward' subtracts beta * the reply's summed KL from its score (RLOO): the advantage is the "
        "estimator's on the scores minus beta * the estimator's, unscaled, on the summed KLs.",
    )
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = Field(
        "sequence",
        description="How per-token losses become one: 'sequence' averages each reply's tokens, then the replies "
        "(GRPO's paper, TRL's loss_type 'grpo'); 'token' averages over all tokens of the minibatch (DAPO); "
        "'dr_grpo' sums and divides by replies x response_length (Dr. GRPO).",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave replies cut off at response_length (no EOS) out of the loss."
    )
    clip_range_high: float | None = Field(
        None, gt=0.0, alias="epsilon_high", description="Upper ratio clip: clip(ratio, 1 - epsilon, 1 + "
        "epsilon_high) (DAPO's clip-higher; its paper uses 0.28 with epsilon 0.2). Null: epsilon."
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="'token': one ratio per token; 'sequence': each reply's ratio is exp(mean over its "
        "tokens of the log-ratio), on all its tokens (GSPO; its paper clips at epsilon 3e-4 / epsilon_high 4e-4)."
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: groups whose scores are all equal are dropped and more prompts "
        "sampled until the batch is full (at most dynamic_sampling_max_rounds rollout rounds per iteration)."
    )
    dynamic_sampling_max_rounds: int = Field(
        4, gt=0, description="(dynamic_sampling) Rollout rounds per iteration at most; when they do not fill the "
        "batch, it is topped up with dropped groups (advantage 0), counted as dynamic_sampling/topped_up."
    )

    @field_validator("advantage_estimator")
    @classmethod
    def _estimator_name_or_function(cls, value):
        if value in ADVANTAGE or is_reference(value):  # a function is loaded when the chain is planned
            return value
        names = ", ".join(repr(name) for name in ADVANTAGE)
        raise ValueError(f"expected one of {names} or a function 'file.py:name' / 'package.module:name', got {value!r}")

    @property
    def group_size(self) -> int:
        return self.num_generations

    @property
    def estimator(self) -> str:
        return self.advantage_estimator

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_in == "loss"

    @property
    def ratio_clip_high(self) -> float | None:
        return self.clip_range_high

    @property
    def ratio_level(self) -> str:
        return self.importance_sampling_level

    @property
    def drops_equal_groups(self) -> bool:
        return self.dynamic_sampling


class GRPOOptions(CriticFreeOptions):
    """GRPO (DeepSeekMath): group-normalised rewards, per-token clipped surrogate, KL (k3) in the loss.
    Keys take TRL's GRPOConfig names where TRL has one (beta, epsilon, num_iterations, num_generations)."""

    kl_coef: float = Field(
        0.04, ge=0.0, alias="beta",
        description="KL coefficient (0: no reference model is loaded at all).",
    )
    clip_range: float | None = Field(0.2, gt=0.0, alias="epsilon", description="Ratio clip epsilon (null: no clipping).")
    ppo_epochs: int = Field(1, gt=0, alias="num_iterations", description="Updates per rollout batch (GRPO's mu).")
    kl_estimator: KLEstimatorName = Field("k3", description=KL_HELP.replace("Per-token", "('k3' as GRPO, TRL) Per-token"))
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature; log-probs are taken at the same temperature.")


class RLOOOptions(CriticFreeOptions):
    """RLOO (Ahmadian et al. 2024): k replies per prompt, leave-one-out baseline, KL in the reward."""

    advantage_estimator: str = Field(
        "rloo", description=CriticFreeOptions.model_fields["advantage_estimator"].description
    )
    kl_coef: float = Field(
        0.05, ge=0.0, alias="beta", description="KL coefficient (0: no reference model is loaded at all)."
    )
    kl_in: Literal["loss", "reward"] = Field(
        "reward", description=CriticFreeOptions.model_fields["kl_in"].description
    )
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = Field(
        "token", description=CriticFreeOptions.model_fields["loss_aggregation"].description
    )
    clip_range: float | None = Field(0.2, gt=0.0, alias="epsilon", description="Ratio clip epsilon (null: no clipping).")
    ppo_epochs: int = Field(1, gt=0, alias="num_iterations", description="Updates per rollout batch.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature; log-probs are taken at the same temperature.")


class PromptDataOptions(DataOptions):
    """Prompts of the RL stages: rows with a user prompt (`prompt_field`); its other columns go to Python
    reward functions. demo: the demo world's training prompts (never the held-out ones the report uses)."""

    num_examples: int | None = _num_examples(2000, "prompts")
    max_prompt_length: int = Field(
        512, gt=0, description="Prompts longer than this many tokens after the chat template (its system prompt "
        "included) are dropped and counted."
    )


class RLRecipe(BaseRecipe):
    """What ppo, grpo and rloo share: prompts and the reward sources."""

    UNREAD = _unread_fields("prompt_field")
    reward_model: ModelRef | None = Field(
        None,
        description="Reward model (a one-label sequence classifier): a path, a hub id or {from: reward.yaml}. "
        "ppo: the critic starts from it too.",
    )
    reward_fn: RewardFunctions = Field(
        default_factory=list,
        description="Python reward functions, 'file.py:name' or 'package.module:name', called as "
        "name(prompts=..., completions=..., **columns) -> list of floats (TRL's GRPO reward functions work "
        "unchanged); 'gold': the demo world's gold oracle. A single string is one function.",
    )
    reward_weights: list[float] | None = Field(None, description=REWARD_WEIGHTS_HELP)
    data: PromptDataOptions = Field(default_factory=PromptDataOptions)
    training: PolicyTrainingOptions = Field(default_factory=PolicyTrainingOptions)

    @model_validator(mode="after")
    def _reward_sources(self):
        if self.reward_model is None and not self.reward_fn:
            raise ValueError("no reward: set reward_model, reward_fn or both")
        check_reward_weights(self.reward_model is not None, self.reward_fn, self.reward_weights)
        o = self.rl
        per_minibatch = o.batch_size // o.num_minibatches
        if per_minibatch % self.training.gradient_accumulation_steps:
            raise ValueError(
                f"{self.stage}.batch_size / {self.stage}.num_minibatches = {per_minibatch} rollouts is not divisible by "
                f"training.gradient_accumulation_steps {self.training.gradient_accumulation_steps}"
            )
        return self

    @property
    def rl(self) -> RLOptions:
        """The stage's own section (ppo, grpo or rloo)."""
        return getattr(self, self.stage)


class PPORecipe(RLRecipe):
    stage: Literal["ppo"]
    ppo: PPOOptions = Field(default_factory=PPOOptions)


class GRPORecipe(RLRecipe):
    stage: Literal["grpo"]
    grpo: GRPOOptions = Field(default_factory=GRPOOptions)


class RLOORecipe(RLRecipe):
    stage: Literal["rloo"]
    rloo: RLOOOptions = Field(default_factory=RLOOOptions)


# --------------------------------------------------------------------------- sweeps


SweepValues = dict[str, list[Any]]


class SweepMethod(Section):
    """One method of a sweep: a recipe and the settings its points take. Keys are override keys
    (`dpo.beta`: the method's recipe; `sft:training.max_steps`: a recipe of its chain by name;
    `*:world`: every recipe of the chain)."""

    recipe: str = Field(description="The method's recipe (a path, relative to the sweep file or the working directory).")
    set: dict[str, Any] = Field(default_factory=dict, description="Keys every point of this method takes, e.g. {dpo.loss_type: ipo}.")
    grid: SweepValues = Field(
        default_factory=dict, description="Key -> list of values: one point per combination, e.g. {dpo.beta: [0.1, 0.5]}."
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list, description="Points given one by one (key -> value each); crossed with `grid` when both are set."
    )

    @field_validator("grid")
    @classmethod
    def _lists(cls, value):
        for key, values in value.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{key}: expected a non-empty list of values, got {values!r}")
        return value


class SweepRecipe(BaseRecipe):
    """A sweep (`alignment sweep RECIPE`): each method's recipe run at every point of its grid, each
    point an ordinary run with its own output directory (shared parents built once), then one
    comparison of every point against the baseline and the frontier report (score against KL)."""

    UNREAD = ("model", "lora", "training", "data", "report")
    stage: Literal["sweep"]
    methods: dict[str, SweepMethod] = Field(
        default_factory=dict, description="Method name -> its recipe and points; a name labels its curve."
    )
    grid: SweepValues = Field(
        default_factory=dict, description="Key -> values crossed with every method's points, e.g. {seed: [1, 2]}."
    )
    set: dict[str, Any] = Field(default_factory=dict, description="Keys every point of every method takes.")
    baseline: ModelRef | None = Field(
        None, description="The reference every point is measured against (KL, win rates), e.g. {from: sft.yaml}."
    )
    reward_model: ModelRef | None = Field(
        None, description="A one-label classifier that also scores every reply: the proxy reward beside gold."
    )
    chain_dir: str | None = Field(
        None, description="Where the points' shared parent stages (init, sft, reward...) are written. Null: "
        "<output_dir>/chain."
    )
    jobs: int = Field(
        1, gt=0, description="Points trained at once, each in a process of its own with its share of the cores "
        "(after the shared parents); `alignment sweep --jobs N` overrides it."
    )
    prompts: PromptOptions = Field(default_factory=PromptOptions)
    generation: GenerationOptions = Field(default_factory=lambda: GenerationOptions(samples_per_prompt=2))

    @field_validator("grid")
    @classmethod
    def _lists(cls, value):
        return SweepMethod._lists(value)

    @model_validator(mode="after")
    def _needs_model(self):  # replaces BaseRecipe's: `methods` and `baseline` instead of `model`
        if not self.methods:
            raise ValueError("methods: a sweep needs at least one method (name: {recipe: ..., grid: {...}})")
        if self.baseline is None:
            raise ValueError("missing required key 'baseline' (the model points are measured against, e.g. {from: sft.yaml})")
        return self


RECIPE_CLASSES: dict[str, type[BaseRecipe]] = {
    "init": InitRecipe,
    "pretrain": PretrainRecipe,
    "sft": SFTRecipe,
    "reward": RewardRecipe,
    "dpo": DPORecipe,
    "kto": KTORecipe,
    "online_dpo": OnlineDPORecipe,
    "ppo": PPORecipe,
    "grpo": GRPORecipe,
    "rloo": RLOORecipe,
    "prep": PrepRecipe,
    "compare": CompareRecipe,
    "sweep": SweepRecipe,
}


def model_inputs(recipe: BaseRecipe) -> dict[str, "str | FromRecipe"]:
    """The recipe's inputs that may name another recipe: its model-valued keys (`model`, `ref_model`,
    `reward_model`...; a mapping of them, compare's `models`, gives one role per label, e.g.
    `models.sft`) and, under the role `data`, `data.source` when it is {from: prep_recipe.yaml}."""
    found = {}
    for role, info in type(recipe).model_fields.items():
        value = getattr(recipe, role)
        if value is not None and "FromRecipe" in str(info.annotation):
            if isinstance(value, dict):
                found.update({f"{role}.{label}": item for label, item in value.items()})
            else:
                found[role] = value
    if isinstance(recipe.data.source, FromRecipe):
        found["data"] = recipe.data.source
    return found


def data_files(recipe: BaseRecipe) -> list[str]:
    """Local data sources the recipe reads (for its content hash): `data.source`, prep's sources,
    compare's prompt file and the files of a recipe's Python functions (reward functions of the RL
    stages, online_dpo and prep; an RL stage's advantage estimator)."""
    sources = [recipe.data.source] if isinstance(recipe.data.source, str) else []
    sources += [s.path for s in getattr(getattr(recipe, "prep", None), "sources", [])]
    sources += [recipe.prompts.source] if isinstance(recipe, CompareRecipe) else []
    refs = getattr(recipe, "reward_fn", []) + ([recipe.rl.estimator] if isinstance(recipe, RLRecipe) else [])
    sources += [file for ref in refs if (file := reference_file(ref))]
    return [s for s in sources if s != "demo"]


def resolved_dict(recipe: BaseRecipe) -> dict:
    """Every key with its value after defaults and overrides (the launcher line dropped)."""
    return recipe.model_dump(mode="json", by_alias=True, exclude={"launcher"})

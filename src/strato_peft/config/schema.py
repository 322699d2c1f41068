"""Typed experiment configuration.

Every section forbids unknown keys, so a typo is an error (with a suggestion, see
:mod:`strato_peft.config.loader`) instead of a silently ignored setting. Field names
follow the product spec's example YAML (``model.path``, ``peft.rank``,
``training.gradient_accumulation_steps``, ``device_info.device_type`` ...).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from strato_peft.registry import METHODS, TASKS, check_name

DeviceType = Literal["auto", "cuda", "rocm", "mps", "cpu"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ModelSource = Literal["auto", "hub", "local", "gguf", "packaged", "tiny", "architecture"]
SEED_MAX = 2**32 - 1
"""The largest seed numpy's ``np.random.seed`` (which ``set_seed`` calls) accepts."""

log = logging.getLogger(__name__)


class Section(BaseModel):
    """Base of every config section: strict keys, assignment re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ArchitectureConfig(Section):
    """Architecture fields, enough to build a model on the meta device (no weights)."""

    type: Literal["llama"] = "llama"
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(default=4096, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    head_dim: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchitectureConfig:
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({kv})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless head_dim is set"
            )
        return self


class ModelConfig(Section):
    """Which base model to load and how.

    ``source`` picks the loader; ``auto`` infers it from ``path`` (a ``.gguf`` file,
    an existing folder, else a hub id) or from ``architecture`` when there is no path.
    """

    name: str = Field(min_length=1, description="Short name used in run folder paths.")
    path: str | None = None
    source: ModelSource = "auto"
    gguf_file: str | None = None
    architecture: ArchitectureConfig | None = None
    device_map: str | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None


class AdaLoraSettings(Section):
    """AdaLoRA schedule (Zhang et al., 2023); ``peft.rank`` is the *target* average rank."""

    init_rank: int | None = Field(default=None, gt=0)
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    delta_t: int = Field(default=1, gt=0)
    beta1: float = Field(default=0.85, gt=0, lt=1)
    beta2: float = Field(default=0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(default=0.5, ge=0)


class StratoCostWeights(Section):
    """Weights of the normalised costs (each a fraction of the reference) in the reward."""

    params: float = Field(default=0.5, ge=0)
    flops: float = Field(default=0.5, ge=0)
    memory: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> StratoCostWeights:
        if not (self.params or self.flops or self.memory):
            raise ValueError("at least one of params, flops, memory must be > 0")
        return self


class StratoBudget(Section):
    """Hard caps relative to the reference LoRA configuration (``None`` = no cap).

    A cap above 1 lets the search spend more than the reference itself; that is allowed
    (a larger-than-LoRA search) but logged as a warning, since it is usually a percentage
    typed for a fraction (``70`` for ``0.7``).
    """

    params: float | None = Field(default=0.7, gt=0)
    flops: float | None = Field(default=None, gt=0)

    def cap_warnings(self) -> list[str]:
        """One message per cap above 1 (naming its key)."""
        return [
            f"peft.strato.budget.{key}={value:g} is above 1: the cap allows more than the "
            f"reference LoRA's {key} (caps are fractions of the reference, 0.7 = 70%)"
            for key, value in (("params", self.params), ("flops", self.flops))
            if value is not None and value > 1
        ]

    @model_validator(mode="after")
    def _warn_above_reference(self) -> StratoBudget:
        for message in self.cap_warnings():
            log.warning(message)
        return self


class StratoReference(Section):
    """The uniform LoRA configuration that STRATO's costs are measured against."""

    rank: int = Field(default=16, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class StratoSearch(Section):
    """How much real evaluation the search may spend, and how the controller learns.

    A *real evaluation* is a short fine-tune (``steps_per_evaluation`` optimizer steps
    with the run's training recipe) followed by the held-out loss on
    ``eval_examples`` held-out examples. The evaluation of the reference LoRA that
    scores are normalised by counts as one of ``evaluations``.
    """

    evaluations: int = Field(default=16, gt=1)
    steps_per_evaluation: int = Field(default=50, gt=0)
    max_wall_time_s: float | None = Field(default=None, gt=0)
    eval_examples: int = Field(default=64, gt=0)
    probe_batches: int = Field(default=2, gt=0, description="Batches of the sensitivity probe.")
    policy_timesteps: int = Field(
        default=4096, gt=0, description="PPO steps on the surrogate between real evaluations."
    )
    candidates: int = Field(default=64, gt=0, description="Policy samples per proposal round.")
    explore_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Share of proposals that return to an elite."
    )
    archive_path: str | None = Field(
        default=None, description="SQLite archive (default: archive.sqlite in the run folder)."
    )
    mode: Literal["per_slot", "structured"] = Field(
        default="per_slot",
        description="per_slot: a rank per (layer, module) slot, the first version's search; "
        "structured: the lowest adapted layer and a rank per module type, promoted by "
        "successive halving over real evaluations (docs/strato.md).",
    )
    depth_fractions: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75],
        description="structured: where the lowest adapted layer may be, as fractions of depth.",
    )
    rungs: list[int] = Field(
        default_factory=lambda: [4, 8, 16],
        description="structured: optimizer steps of each successive-halving rung; survivors "
        "resume from their stored state, the winner continues into the final training.",
    )
    proposals: list[int] = Field(
        default_factory=lambda: [4, 3],
        description="structured: candidates proposed per batch at the first rung (the "
        "surrogate is refitted to the real evaluations between batches).",
    )
    probe_seeds: int = Field(default=2, gt=0, description="Sensitivity probes (seeds) averaged.")
    surrogate_gain: Literal["per_parameter", "mass", "size"] = Field(
        default="mass",
        description="What the surrogate weighs a slot's log-rank by: per_parameter = the "
        "probe's sensitivity per parameter (v2 as first measured; with the budget pricing "
        "every parameter again, small modules are counted twice); mass = that times the "
        "slot's parameters per rank, so the gain per parameter the budget trades off is the "
        "per-parameter sensitivity; size = the slot's size alone, no probe (the probe's "
        "ablation; docs/strato.md).",
    )


class StratoSettings(Section):
    """Settings of the STRATO search (used when ``peft.method`` is ``strato``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    rank_menu: list[int] = Field(default_factory=lambda: [0, 2, 4, 8, 16, 32])
    module_types: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    lambda_: float = Field(default=0.5, ge=0, alias="lambda")
    cost_weights: StratoCostWeights = Field(
        default_factory=StratoCostWeights,
        description="Mix of the normalised costs that lambda multiplies in the reward.",
    )
    reference: StratoReference = Field(default_factory=StratoReference)
    budget: StratoBudget = Field(default_factory=StratoBudget)
    search: StratoSearch = Field(default_factory=StratoSearch)
    control: Literal["none", "uniform", "band", "random", "random-search", "replay"] = Field(
        default="none",
        description="none: the search; uniform: LoRA on the reference's modules, all layers, "
        "at the same params (see control_from); band: every module type from the found "
        "lowest layer up at the uniform rank of the same params; random: a random allocation "
        "of the space (within 5% of control_from's params and FLOPs when given); "
        "random-search: the whole search with random proposals (the controller's ablation); "
        "replay: control_from's allocation itself, trained from scratch with this run's "
        "recipe (learning-rate grids, alpha-policy rows, calibration of the proxy).",
    )
    control_from: str | None = Field(
        default=None,
        description="A STRATO run folder whose allocation.json the controls match (uniform: "
        "its params, default: the params budget); for replay also an allocation JSON file.",
    )

    @field_validator("rank_menu")
    @classmethod
    def _menu(cls, menu: list[int]) -> list[int]:
        if not menu or any(r < 0 for r in menu):
            raise ValueError("rank_menu must be a non-empty list of ranks >= 0")
        return sorted(set(menu))


StepSpec = int | float


class RankScheduleSettings(Section):
    """Dynamic rank scheduling during training (``docs/rank_schedule.md``).

    Ranks of LoRA modules grow and shrink with real tensor resizing; the total trainable
    params never exceed those of the initial allocation. Step settings take an int (optimizer
    steps) or a float in [0, 1) (a fraction of the run's total steps), so one config works
    for a 4-step ``--fast-dev-run`` and a long run alike.
    """

    enabled: bool = False
    warmup: StepSpec = Field(default=0.1, description="No reallocation up to this step.")
    final_freeze: StepSpec = Field(
        default=0.2, description="No reallocation in the last steps of the run."
    )
    interval: StepSpec = Field(default=0.1, description="Reallocate every N steps after warm-up.")
    at_steps: list[StepSpec] | None = Field(
        default=None, description="Explicit reallocation steps (replaces interval)."
    )
    importance: Literal["sensitivity", "singular_values"] = "sensitivity"
    ema_beta: float = Field(default=0.85, ge=0, lt=1)
    move_fraction: float = Field(
        default=0.25, gt=0, le=0.5, description="Share of modules that give rank per event."
    )
    rank_step: int = Field(default=2, gt=0, description="Rank moved per module per event.")
    min_rank: int = Field(
        default=1, ge=0, description="0 lets a module lose its adapter (LoRA only)."
    )
    max_rank: int | None = Field(default=None, gt=0, description="Default: 2 x largest rank.")

    @field_validator("warmup", "final_freeze", "interval")
    @classmethod
    def _step_spec(cls, value: StepSpec) -> StepSpec:
        return _check_step_spec(value)

    @field_validator("at_steps")
    @classmethod
    def _step_list(cls, values: list[StepSpec] | None) -> list[StepSpec] | None:
        if values is not None:
            if not values:
                raise ValueError("at_steps must list at least one step (or be null)")
            for value in values:
                _check_step_spec(value)
        return values

    @model_validator(mode="after")
    def _ranks_ordered(self) -> RankScheduleSettings:
        if self.max_rank is not None and self.max_rank < max(self.min_rank, 1):
            raise ValueError(
                f"max_rank ({self.max_rank}) must be >= min_rank ({self.min_rank}) and >= 1"
            )
        return self


def _check_step_spec(value: StepSpec) -> StepSpec:
    if isinstance(value, float) and not 0 <= value < 1:
        raise ValueError(
            f"{value} is neither a step count (an int) nor a fraction of the run in [0, 1)"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"steps must be >= 0, got {value}")
    return value


class PeftSettings(Section):
    """Which PEFT method and its hyper-parameters."""

    method: str = "lora"
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    alpha_policy: Literal["fixed", "proportional", "rslora"] = Field(
        default="fixed",
        description="alpha of mixed-rank allocations (STRATO and its controls): fixed = "
        "peft.alpha everywhere (scale alpha/r); proportional = alpha x r / reference rank "
        "(the reference's alpha/r everywhere); rslora = alpha / sqrt(r).",
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    strato: StratoSettings = Field(default_factory=StratoSettings)
    rank_schedule: RankScheduleSettings = Field(default_factory=RankScheduleSettings)

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        return check_name("method", name, METHODS)

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, pattern: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in pattern.items() if v <= 0}
        if bad:
            raise ValueError(f"ranks must be > 0, got {bad}")
        return pattern

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_non_negative(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError("layers_to_transform must be a non-empty list of layer indices >= 0")
        return layers


class TaskConfig(Section):
    """Which task and which data."""

    name: str = "gsm8k"
    data_path: str | None = None
    subset: str | None = None
    max_length: int = Field(default=512, gt=0)
    limit: int | None = Field(default=None, gt=0)
    eval_limit: int | None = Field(default=None, gt=0)
    search_examples: int = Field(
        default=0,
        ge=0,
        description="Problems held out of the training data as STRATO's search-validation "
        "split (never trained on, by any arm); the report split (eval) is never searched on.",
    )
    num_fewshot: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="Generation cap of generative tasks (GSM8K, HumanEval)."
    )
    final_eval: bool = Field(
        default=True, description="Run the task's evaluator (accuracy, pass@k ...) after training."
    )
    unsafe_exec: bool = Field(
        default=False,
        description="HumanEval: where bubblewrap is unavailable, execute generated code anyway, "
        "without an OS sandbox (a loud warning; see docs/security.md). Unused where bwrap works.",
    )

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        return check_name("task", name, TASKS)


class TrainingConfig(Section):
    """Optimisation settings. ``max_steps`` (optimizer steps) wins over ``num_epochs``."""

    batch_size: int = Field(default=4, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    num_epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    gradient_accumulation_steps: int = Field(default=16, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    eval_every_steps: int | None = Field(default=None, gt=0)
    save_every_steps: int | None = Field(default=None, gt=0)


class DeviceInfoConfig(Section):
    """Platform and precision. ``precision: auto`` picks bf16, else fp16, else fp32."""

    device_type: DeviceType = "auto"
    mixed_precision: bool = True
    precision: Precision = "auto"
    compile_model: bool = False
    gpu_ids: list[int] | None = None

    @model_validator(mode="after")
    def _precision_possible(self) -> DeviceInfoConfig:
        """Reject what :func:`strato_peft.platform.choose_precision` rejects on any machine."""
        if self.precision in ("bf16", "fp16"):
            if not self.mixed_precision:
                raise ValueError(
                    f"device_info.precision={self.precision} needs "
                    "device_info.mixed_precision=true (without mixed precision a run trains "
                    "in fp32); set device_info.precision to fp32 or auto"
                )
            if self.device_type == "mps":
                raise ValueError(
                    f"device_info.precision={self.precision}: mixed precision is not "
                    "supported on mps (device_info.device_type=mps); use fp32 or auto"
                )
        return self


class LoggingConfig(Section):
    """Logs, trackers and profiling."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_dir: str = "logs"
    wandb: bool = True
    wandb_project: str = "strato-peft"
    wandb_entity: str | None = None
    tensorboard: bool = True
    profile: bool = False


class OutputConfig(Section):
    """Where run folders go: ``<dir>/<model>/<task>/<method>_rank<r>[_lambda<l>]_seed<s>/``."""

    dir: str = "results"
    save_adapter: bool = True


class ExperimentMeta(Section):
    """Names a run carries into trackers (tag ``model/task/phase/lambdaX_rankY_seedZ``)."""

    name: str | None = None
    phase: str = "dev"
    description: str | None = None


class ExperimentConfig(Section):
    """The whole, resolved configuration of one run."""

    seed: int = Field(
        default=42, ge=0, le=SEED_MAX, description="numpy's seed range: 0 .. 2**32 - 1."
    )
    experiment: ExperimentMeta = Field(default_factory=ExperimentMeta)
    model: ModelConfig
    peft: PeftSettings = Field(default_factory=PeftSettings)
    task: TaskConfig = Field(default_factory=TaskConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    device_info: DeviceInfoConfig = Field(default_factory=DeviceInfoConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

"""`llmkern train`'s configuration: one `TrainConfig` of sections, read from YAML or JSON.

    config = load_config("examples/configs/lora.yaml", overrides=["optim.lr=1e-3", "parallel.dp=2"])

Every section is a kw_only, slots dataclass with a docstring under each field; modes are Literals.
`load_config` checks everything a run needs before any process starts: unknown keys and wrong
types (naming the dotted field, e.g. ``parallel.dp``), degrees that do not multiply to the number
of processes, a method the model or the layout cannot take, engines this build does not have.
Every error is a `ConfigError` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

Method = Literal["full", "lora", "adapter", "prefix", "prompt", "ptuning"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
PROMPT_METHODS = ("prefix", "prompt", "ptuning")


class ConfigError(ValueError):
    """A config that cannot run; the message names the field (``section.field``)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The model: a tiny Llama built from a config (no download) or a local Hugging Face directory."""

    source: Literal["tiny", "local"] = "tiny"
    """"tiny": a LlamaForCausalLM built from the sizes below with random weights. "local": loaded with
    transformers' from_pretrained from `path` (nothing is downloaded)."""
    path: str | None = None
    """Directory of a saved Hugging Face causal LM (config.json and weights); source "local" only."""
    hidden: int = 128
    """Width of the tiny model."""
    layers: int = 2
    """Decoder layers of the tiny model."""
    heads: int = 4
    """Attention heads of the tiny model (its key/value heads too)."""
    intermediate: int = 256
    """MLP width of the tiny model."""


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training sequences come from and how they are cut."""

    source: Literal["synthetic", "jsonl"] = "synthetic"
    """"synthetic": the digit tasks of llmkern.demo (reversal without a task token, after a base
    pretrained on COPY/REV if schedule.pretrain_steps > 0). "jsonl": a local file, one JSON object a
    line: {"text": ...} (loss on every token) or {"prompt": ..., "response": ...} (SFT: loss on the
    response tokens only)."""
    path: str | None = None
    """The JSONL file (source "jsonl")."""
    tokenizer: str = "byte"
    """"byte": UTF-8 bytes as tokens 0-255 plus PAD/BOS/EOS (needs no download), or a local tokenizer
    directory loaded with transformers.AutoTokenizer."""
    seq_len: int = 128
    """Tokens per JSONL example after truncation (shorter ones are padded; padding is never scored)."""
    eval_fraction: float = 0.1
    """Share of the JSONL examples held out for evaluation (at least one example)."""
    batch_size: int = 64
    """Sequences per optimizer step over all data-parallel ranks (the global batch)."""
    min_len: int = 4
    """Shortest digit string of the synthetic task."""
    max_len: int = 8
    """Longest digit string of the synthetic task."""


@dataclasses.dataclass(kw_only=True, slots=True)
class MethodConfig:
    """What is trained: the whole model or one llmkern.peft method on a frozen base."""

    name: Method = "lora"
    """"full" trains every parameter; the others go through llmkern.peft (apply_lora, apply_adapters,
    apply_prefix_tuning, apply_prompt_tuning, apply_p_tuning) and freeze the base."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout on the adapter's input."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names LoRA replaces."""
    bottleneck: int = 16
    """Bottleneck width of the adapters."""
    virtual_tokens: int = 8
    """Virtual tokens of prefix, prompt and P-tuning."""


@dataclasses.dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    """Dtype of the trained weights and the loss scaler."""

    dtype: Precision = "auto"
    """"auto": bf16 on a GPU that has it (fp16 otherwise), fp32 on a CPU, where torch's 16-bit
    matmuls are slower than fp32 (see llmkern/train/runner.py). "fp16" uses the dynamic loss scaler;
    16-bit weights get fp32 masters in FusedAdamW."""
    init_scale: float = 2.0 ** 16
    """First loss scale (fp16 only)."""
    growth_interval: int = 100
    """Clean steps before the loss scale doubles (fp16 only)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class KernelsConfig:
    """Which implementation llmkern's fused ops use."""

    lora_backend: Literal["cpu", "ref", "triton", "cuda"] | None = None
    """Backend of the fused lora_linear op: None picks the fastest usable one (the C++ kernel on a
    CPU); "ref" is plain PyTorch. A backend that cannot run here is refused with its reason."""
    patch: bool = False
    """Swap llmkern's fused kernels into the model (llmkern.patch.apply_llmkern_kernels: RMSNorm,
    SwiGLU, RoPE and the loss) before training; the run prints what was patched and what was skipped."""


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelLayout:
    """How the processes split the work. dp * pp * tp must equal nproc."""

    nproc: int = 1
    """Processes; > 1 relaunches `llmkern train` under torchrun (gloo on CPU)."""
    dp: int = 1
    """Data-parallel replicas (llmkern DDP, gradients averaged in fp32 during backward)."""
    pp: int = 1
    """Pipeline stages (llmkern.parallel.apply_pipeline)."""
    tp: int = 1
    """Tensor-parallel ranks (needs the tensor-parallel engine)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage of the data-parallel replicas; 0 is plain DDP (needs the ZeRO engine for 1-3)."""
    offload: bool = False
    """Keep the optimizer states and step on the CPU (ZeRO-Offload; needs zero_stage >= 1)."""
    microbatches: int = 4
    """Micro-batches per step of the pipeline (pp > 1)."""
    schedule: PipelineSchedule = "1f1b"
    """Pipeline schedule (pp > 1)."""
    timeout_s: float = 120.0
    """Seconds a collective waits for a peer before every rank raises naming the ones that stopped."""


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimConfig:
    """FusedAdamW's hyperparameters."""

    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's beta1, beta2."""
    eps: float = 1e-8
    """Adam's epsilon."""
    clip_norm: float | None = 1.0
    """Global gradient-norm clip (inside the fused step); None disables it."""


@dataclasses.dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Steps, learning-rate shape and seeds."""

    steps: int = 200
    """Optimizer steps of the run."""
    warmup_fraction: float = 0.05
    """Linear warm-up over this share of the steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    pretrain_steps: int = 0
    """Synthetic data only: full fp32 training of the tiny base on the COPY and REV tasks before the
    method is applied (there are no pretrained weights offline; see llmkern/demo.py)."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of the pretraining."""
    seed: int = 0
    """Seed of the model, the method's initialisation and the data."""
    threads: int = 1
    """torch threads per process: this size of model runs one thread per rank best on 2 cores."""


@dataclasses.dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out evaluation."""

    every: int = 50
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    examples: int = 500
    """Held-out synthetic strings (synthetic data)."""
    min_accuracy_gain: float | None = None
    """Synthetic data: the run exits non-zero when held-out exact-match accuracy gains less than this
    from before to after training; None: no threshold."""


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) and the saved adapter."""

    every: int = 0
    """Save a checkpoint every this many steps into <run>/checkpoints/step-N; 0: never."""
    save_adapter: bool = True
    """At the end, save the method in PEFT's format into <run>/adapter (llmkern's own safetensors for
    bottleneck adapters, which PEFT lacks; the whole model for "full")."""


@dataclasses.dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Where the run writes and what it shows."""

    out_dir: str = "runs"
    """Each run writes <out_dir>/<name>-<UTC timestamp>/: config.yaml, metrics.jsonl, loss.png,
    checkpoints/, base/ and adapter/."""
    name: str | None = None
    """Run name; None: the config file's stem."""
    log_every: int = 10
    """Write a metrics line (loss, lr, scale, tokens/s) every this many steps."""
    progress: bool = True
    """A tqdm progress bar on rank 0."""
    plot: bool = True
    """Draw loss.png (matplotlib) at the end."""


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One `llmkern train` run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The data."""
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    """The fine-tuning method."""
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    """Weights' dtype and loss scaling."""
    kernels: KernelsConfig = dataclasses.field(default_factory=KernelsConfig)
    """Kernel backends."""
    parallel: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    """The parallel layout."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """The optimizer."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Steps and learning rate."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Evaluation."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoints and the saved adapter."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Output folder, metrics, progress bar."""


# ---------------------------------------------------------------------------------------------
# Reading

def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" + (f" ({len(args)} of them)" if origin is tuple else "")
    return {type(None): "null", int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, where: str):
    """`value` checked against the annotation `tp` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads YAML 1.1, where 1e-4 (no dot) is a string, not a float: the field's type
            # decides, so "lr: 1e-4" means the number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp in (int, bool, str):
        if type(value) is tp:
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    else:  # pragma: no cover - every annotation above is one of these
        raise TypeError(f"{where}: unsupported annotation {tp!r}")
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping of {cls.__name__}'s fields, got "
                          f"{type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (the {where or 'top level'} section has: "
                          f"{', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def field_type(path: str):
    """The annotation of a dotted field of TrainConfig, e.g. "parallel.dp" -> int."""
    cls, tp = TrainConfig, None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {path}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"--set {path}: unknown key {'.'.join(parts[:i + 1])} (the {where} section has: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        tp = hints[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
    return tp


def apply_override(data: dict, override: str) -> None:
    """Applies one ``a.b=value`` to the raw mapping `data`. The value is read as YAML (``2``, ``1e-3``,
    ``true``, ``null``, ``[q_proj, v_proj]``) except for string fields, which take it verbatim (``null``
    still clears an optional one)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.field=value")
    path, raw = override.split("=", 1)
    path = path.strip()
    tp = field_type(path)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"--set {path}: {path} is a section; set one of its fields")
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    takes_str = tp is str or (union and str in typing.get_args(tp))
    if raw.strip() in ("", "null", "~") and union and type(None) in typing.get_args(tp):
        value = None
    else:
        value = raw if takes_str else yaml.safe_load(raw)
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {path}: {part} is not a mapping in the config file")
        node = nxt
    node[parts[-1]] = value


def read_mapping(path: str | Path) -> dict:
    """The raw mapping of a YAML (.yaml/.yml) or JSON (.json) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A checked TrainConfig from a raw mapping plus ``a.b=value`` overrides."""
    data = json.loads(json.dumps(data))  # a deep copy the overrides may change
    for o in overrides:
        apply_override(data, o)
    config = _build(TrainConfig, data, "")
    validate(config)
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Reads, overrides and validates a config file (see the module docstring). The run name
    defaults to the file's stem."""
    data = read_mapping(path)
    config = from_dict(data, overrides)
    if config.logging.name is None:
        config.logging.name = Path(path).stem
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML/JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


# ---------------------------------------------------------------------------------------------
# Checks that need more than one field

def _positive(config: TrainConfig, *paths: str, allow_zero: bool = False) -> None:
    for p in paths:
        section, name = p.split(".")
        v = getattr(getattr(config, section), name)
        if v is not None and (v < 0 if allow_zero else v <= 0):
            raise ConfigError(f"{p} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def local_model_type(path: str) -> str:
    """``model_type`` from a local Hugging Face directory's config.json."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"model.path: {path} has no config.json (expected a directory saved with "
                          f"save_pretrained)")
    return json.loads(cfg.read_text()).get("model_type", "?")


def validate(config: TrainConfig) -> None:
    """Raises ConfigError for a config that cannot run, naming the field. Runs before any process
    starts (and again on every rank, which reads the same file)."""
    m, d, me, par, s = config.model, config.data, config.method, config.parallel, config.schedule
    _positive(config, "model.hidden", "model.layers", "model.heads", "model.intermediate", "data.seq_len",
              "data.batch_size", "data.min_len", "data.max_len", "method.r", "method.bottleneck",
              "method.virtual_tokens", "parallel.nproc", "parallel.dp", "parallel.pp", "parallel.tp",
              "parallel.microbatches", "parallel.timeout_s", "optim.lr", "optim.eps", "optim.clip_norm",
              "schedule.steps", "schedule.threads", "eval.examples", "logging.log_every",
              "precision.init_scale", "precision.growth_interval")
    _positive(config, "schedule.pretrain_steps", "schedule.pretrain_lr", "eval.every", "checkpoint.every",
              "optim.weight_decay", "method.dropout", allow_zero=True)
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if not 0.0 <= s.warmup_fraction < 1.0 or not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.warmup_fraction must be in [0, 1) and schedule.min_lr_ratio in [0, 1], got "
                          f"{s.warmup_fraction} and {s.min_lr_ratio}")
    if d.min_len > d.max_len:
        raise ConfigError(f"data.min_len ({d.min_len}) must be <= data.max_len ({d.max_len})")
    if m.source == "local":
        if not m.path:
            raise ConfigError("model.path: model.source is 'local' but no directory is given")
        model_type = local_model_type(m.path)
        if me.name not in ("full", "lora"):
            from llmkern.peft import SUPPORTED_MODEL_TYPES
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ConfigError(f"method.name: {me.name!r} is not supported for model_type {model_type!r} "
                                  f"(model.path {m.path}); llmkern.peft's adapters and prompt methods support "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    elif m.path is not None:
        raise ConfigError(f"model.path is set ({m.path}) but model.source is 'tiny'; set model.source: local")
    if m.source == "tiny" and m.hidden % m.heads:
        raise ConfigError(f"model.heads ({m.heads}) must divide model.hidden ({m.hidden})")
    if d.source == "jsonl":
        if not d.path:
            raise ConfigError("data.path: data.source is 'jsonl' but no file is given")
        if not Path(d.path).is_file():
            raise ConfigError(f"data.path: {d.path} does not exist")
        if d.tokenizer != "byte" and not Path(d.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer: expected 'byte' or a local tokenizer directory, got {d.tokenizer!r} "
                              f"(not a directory; nothing is downloaded)")
        if s.pretrain_steps:
            raise ConfigError("schedule.pretrain_steps: the COPY/REV pretraining is for synthetic data only; "
                              "set it to 0 with data.source: jsonl")
        if config.eval.min_accuracy_gain is not None:
            raise ConfigError("eval.min_accuracy_gain: exact-match accuracy is measured on synthetic data only")
    elif d.path is not None:
        raise ConfigError(f"data.path is set ({d.path}) but data.source is 'synthetic'")
    if s.pretrain_steps and m.source != "tiny":
        raise ConfigError("schedule.pretrain_steps: pretraining from scratch needs model.source: tiny")
    if me.name == "full" and s.pretrain_steps:
        pass  # full fine-tuning of the pretrained base is a valid run

    # The layout.
    product = par.dp * par.pp * par.tp
    if product != par.nproc:
        raise ConfigError(f"parallel: dp * pp * tp = {par.dp} * {par.pp} * {par.tp} = {product}, but parallel.nproc "
                          f"is {par.nproc}")
    if d.batch_size % par.dp:
        raise ConfigError(f"data.batch_size ({d.batch_size}) must split evenly over parallel.dp = {par.dp} replicas")
    if par.pp > 1:
        per_replica = d.batch_size // par.dp
        if per_replica % par.microbatches:
            raise ConfigError(f"parallel.microbatches ({par.microbatches}) must divide the {per_replica} sequences "
                              f"per replica (data.batch_size {d.batch_size} / parallel.dp {par.dp})")
        if par.schedule in ("1f1b", "zero_bubble") and par.microbatches < par.pp:
            raise ConfigError(f"parallel.microbatches ({par.microbatches}) must be >= parallel.pp ({par.pp}) for the "
                              f"{par.schedule} schedule")
        if par.schedule == "interleaved_1f1b":
            raise ConfigError("parallel.schedule: interleaved_1f1b needs virtual stages, which llmkern train does not "
                              "configure yet; use gpipe, 1f1b or zero_bubble")
        if m.source == "tiny" and m.layers < par.pp:
            raise ConfigError(f"parallel.pp ({par.pp}) exceeds model.layers ({m.layers}): every stage needs a layer")
        if me.name in PROMPT_METHODS:
            raise ConfigError(f"method.name: {me.name!r} prepends virtual tokens in the model's forward, which a "
                              f"pipeline (parallel.pp = {par.pp}) cuts into stages; use full, lora or adapter with pp")
    if par.offload and par.zero_stage == 0:
        raise ConfigError("parallel.offload needs parallel.zero_stage >= 1 (ZeRO-Offload keeps the sharded "
                          "optimizer states on the CPU)")
    # The engines are routed in llmkern/train/layout.py; a composition llmkern.parallel.parallelize
    # refuses is refused here, before any process starts, with its reason.
    from llmkern.train import layout
    missing = layout.missing_engines(par)
    if missing:
        raise ConfigError(missing[0])
    if par.zero_stage and par.pp > 1 and m.source == "local" and (Path(m.path) / "config.json").is_file():
        if json.loads((Path(m.path) / "config.json").read_text()).get("tie_word_embeddings", False):
            raise ConfigError(f"parallel.zero_stage ({par.zero_stage}) with parallel.pp ({par.pp}) needs untied "
                              f"embeddings, and {m.path}/config.json ties them (llmkern.parallel.check_degrees: the "
                              f"pipeline exchanges a tied weight's gradient after ZeRO has reduce-scattered it)")
    if m.source == "tiny" and par.tp > 1 and m.heads % par.tp:
        raise ConfigError(f"parallel.tp ({par.tp}) must divide model.heads ({m.heads})")
    if par.tp > 1:
        if me.name not in ("full", "lora"):
            raise ConfigError(f"method.name: {me.name!r} with parallel.tp ({par.tp}): the TP engine converts "
                              f"linear and LoRA layers only; use full or lora")

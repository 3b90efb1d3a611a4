"""Experiment configs: one frozen dataclass, named presets, ``key=value`` overrides.

Presets (``jaxtok pretrain --config NAME``):

* ``default``: a 4-layer, d=256 Llama on the embedded stdlib corpus with a byte-level BPE
  (vocab 4096) trained on that corpus; ~5 minutes on a 2-core CPU, loss falling from ~8.3.
* ``tiny``: seconds; for tests and the notebook.
* ``tokenformer-tiny``: the tiny run with a TokenFormer instead of a Llama.
* ``mamba-tiny`` / ``mamba2-tiny``: the tiny run with a Mamba-1 / Mamba-2 LM.
* ``tokenunify-tiny`` / ``tokenunify-small``: TokenUnify pretraining of a vision Mamba on 3-D volumes.
* ``smollm2-continue``: continued pretraining of SmolLM2-135M with its own tokenizer.

Overrides are dotted keys parsed by the field's type: ``steps=50``, ``optimizer.lr=1e-3``,
``model.d_model=128``, ``data.paths=a.txt,b.txt``, ``data.max_documents=none``. Unknown keys are
rejected with the list of valid ones. ``model=NAME`` picks another model preset (and drops the
model overrides of the old one); ``model.*`` keys are the fields of that preset's config class,
except ``vocab_size`` (set from the tokenizer) and ``dtype``/``param_dtype`` (set by the
experiment's ``dtype``/``param_dtype``).

    jaxtok pretrain --config tiny --set steps=40 model=tokenformer-tiny model.ffn_tokens=256
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flax import linen as nn

from jaxtok.data import DataConfig, make_eval_batches, make_train_iterator, volumes, words
from jaxtok.io.cache import cache_dir
from jaxtok.models import byte_lm, llama, mamba, tokenformer, vision_mamba
from jaxtok.objectives import tokenunify
from jaxtok.sharding import parse_mesh_shape

from . import flops
from .trainer import OptimizerConfig, TrainTask, lm_task

DTYPES = ("float32", "bfloat16")
TRAINABLE = ("all", "embeddings")
BOS = "<|endoftext|>"  # document separator of the trained BPE (SmolLM2 has the same token)
# model.* fields the experiment sets itself
DERIVED_MODEL_FIELDS = frozenset({"vocab_size", "dtype", "param_dtype"})


# ---------------------------------------------------------------------------------------------
# Model families: a table, not a ladder of ifs


@dataclasses.dataclass(frozen=True)
class DataPipeline:
    """Where one family's batches come from.

    Attributes:
      train: ``(config, tokenizer) -> iterator`` of this host's training batches, with
        ``get_state()``/``set_state()`` so that a resumed run continues exactly.
      evaluation: ``(config, tokenizer) -> list`` of this host's evaluation batches (all of them;
        the run keeps the first ``config.eval_batches``).
      tokens_per_step: ``config -> int``, the units (tokens, bytes, patches) one step trains on,
        for tokens/s and MFU.
      uses_tokenizer: whether runs of the family make and keep a ``tokenizer.json`` (volume
        and byte families have none; their builders get ``tokenizer=None``).
      config_cls: the class of the experiment's ``data`` section for this pipeline.
    """

    train: Callable[[Any, Any], Any]
    evaluation: Callable[[Any, Any], list]
    tokens_per_step: Callable[[Any], int]
    uses_tokenizer: bool = True
    config_cls: type = DataConfig


TEXT = DataPipeline(
    train=lambda config, tokenizer: make_train_iterator(config.data, tokenizer),
    evaluation=lambda config, tokenizer: make_eval_batches(config.data, tokenizer),
    tokens_per_step=lambda config: config.data.global_batch * config.data.seq_len,
)


def next_token_task(module: nn.Module, config: Any) -> TrainTask:
    """Next-token cross-entropy of a decoder LM (``config`` is the experiment; unused)."""
    del config
    return lm_task(module)


def transformer_flops(model_config: Any, config: Any) -> float:
    """Training FLOPs per token of a decoder LM (:func:`flops.model_flops_per_token`)."""
    return flops.model_flops_per_token(model_config, config.data.seq_len)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to build one family's model, what feeds it and what trains it.

    ``jaxtok pretrain`` dispatches through these fields only; a new family registers one entry
    in :data:`MODEL_FAMILIES` (with its own pipeline and task builder where text and next-token
    loss do not fit) and needs no change to the trainer or the job.

    Attributes:
      config_cls, presets, module_cls: the model's config class, named configs and flax module.
      data: the :class:`DataPipeline` that feeds it.
      task: ``(module, experiment config) -> TrainTask``: its objective. An experiment's
        ``objective`` section (a frozen dataclass of the family's choosing, or None) carries the
        objective's settings.
      flops_per_token: ``(model config, experiment config) -> float`` training FLOPs per unit of
        ``data.tokens_per_step``, for MFU (None: no MFU reported).
      objective_cls: the class of the experiment's ``objective`` section (None: it has none).
    """

    config_cls: type
    presets: Mapping[str, Any]
    module_cls: Callable[..., nn.Module]
    data: DataPipeline = TEXT
    task: Callable[[nn.Module, Any], TrainTask] = next_token_task
    flops_per_token: Callable[[Any, Any], float] | None = transformer_flops
    objective_cls: type | None = None


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(llama.LlamaConfig, llama.PRESETS, llama.Llama),
    "tokenformer": ModelFamily(tokenformer.TokenFormerConfig, tokenformer.PRESETS, tokenformer.TokenFormer),
    "mamba": ModelFamily(mamba.MambaConfig, mamba.PRESETS, mamba.Mamba),
    # TokenUnify: patch tokens of 3-D volumes, the mixture of token objectives (issue 15)
    "tokenunify": ModelFamily(vision_mamba.VisionConfig, vision_mamba.PRESETS, vision_mamba.TokenUnifyModel,
                              data=DataPipeline(
                                  train=lambda config, tokenizer: volumes.make_volume_iterator(config.data),
                                  evaluation=lambda config, tokenizer: volumes.make_volume_eval_batches(config.data),
                                  tokens_per_step=tokenunify.tokens_per_step, uses_tokenizer=False,
                                  config_cls=volumes.VolumeDataConfig),
                              task=tokenunify.tokenunify_task, flops_per_token=tokenunify.flops_per_token,
                              objective_cls=tokenunify.MixtureConfig),
    # word-pooled byte LM: rows of words, no tokenizer; tokens_per_step and FLOPs count words (issue 16)
    "byte_lm": ModelFamily(byte_lm.ByteLMConfig, byte_lm.PRESETS, byte_lm.ByteLM,
                           data=DataPipeline(train=words.train_iterator, evaluation=words.evaluation_batches,
                                             tokens_per_step=words.words_per_step, uses_tokenizer=False,
                                             config_cls=words.WordDataConfig),
                           task=byte_lm.train_task, flops_per_token=byte_lm.flops_per_word),
}


def model_family(preset: str) -> ModelFamily:
    """The family that owns the model preset ``preset``."""
    for family in MODEL_FAMILIES.values():
        if preset in family.presets:
            return family
    names = sorted(n for f in MODEL_FAMILIES.values() for n in f.presets)
    raise ValueError(f"unknown model preset {preset!r}; available: {names}")


def model_keys(preset: str) -> list[str]:
    """Fields of ``preset``'s config that ``model.KEY=VALUE`` may set."""
    cls = model_family(preset).config_cls
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in DERIVED_MODEL_FIELDS)


# ---------------------------------------------------------------------------------------------
# The experiment config


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run.

    Attributes:
      name: label of the run.
      model: model preset (``llama-tiny``, ``tokenformer-tiny``, ``smollm2-135m`` ...).
      model_overrides: fields replaced on the preset (``model.KEY=VALUE``).
      pretrained: start from this pretrained LM's weights (``load_pretrained_lm`` name, or the
        path of a Hugging Face model folder, e.g. ``jaxtok transfer`` output, or a run directory).
      tokenizer: ``bpe`` (train a byte-level BPE on the training split), ``pretrained`` (the
        pretrained model's) or the path of a ``tokenizer.json``. A run reuses the
        ``tokenizer.json`` already in its run directory.
      tokenizer_vocab: vocabulary size of the trained BPE.
      tokenizer_documents: documents the BPE is trained on (None: the whole training split).
      data: documents and batching (``seq_len``, ``global_batch`` live here); a family with
        its own pipeline puts its own frozen dataclass here (its fields are then the ``data.*`` keys).
      objective: the settings of the family's objective (a frozen dataclass whose fields are the
        ``objective.*`` keys), or None where the objective has none (next-token loss).
      optimizer: AdamW, schedule, clipping, micro-batches.
      steps: last step of the run.
      eval_every: evaluate bits per byte every this many steps and at the end (0: never).
      eval_batches: evaluation batches per evaluation (None: the whole validation split).
      checkpoint_every: save every this many steps and at the end (0: only at the end).
      keep: checkpoints kept on disk.
      run_dir: checkpoints, metrics.jsonl, TensorBoard events, loss.png, tokenizer.json.
      seed: parameter init and per-step randomness (the data order has ``data.seed``).
      mesh: ``data=2,fsdp=2,tensor=2`` (missing axes are 1; empty: every device on ``data``).
      dtype: compute dtype; param_dtype: storage (master) dtype of parameters.
      progress: show the progress bar.
      trainable: ``all`` parameters, or only the ``embeddings`` (the input and output embedding
        matrices: continued training of a transferred model whose body stays frozen).
    """

    name: str = "default"
    model: str = "llama-tiny"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: str | None = None
    tokenizer: str = "bpe"
    tokenizer_vocab: int = 4096
    tokenizer_documents: int | None = None
    data: Any = DataConfig(seq_len=256, global_batch=16, bos_token=BOS)
    objective: Any = None
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000
    eval_every: int = 100
    eval_batches: int | None = 8
    checkpoint_every: int = 100
    keep: int = 3
    run_dir: str = "runs/default"
    seed: int = 0
    mesh: str = ""
    dtype: str = "float32"
    param_dtype: str = "float32"
    progress: bool = True
    trainable: str = "all"

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0 (0: only at the end / never)")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 or None, got {self.eval_batches}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.tokenizer == "pretrained" and self.pretrained is None:
            raise ValueError("tokenizer='pretrained' needs a pretrained model (set pretrained=NAME)")
        if self.tokenizer_vocab < 257:
            raise ValueError(f"tokenizer_vocab must exceed the 256 byte symbols, got {self.tokenizer_vocab}")
        parse_mesh_shape(self.mesh)  # a bad mesh string fails here, before any work
        unknown = set(self.model_overrides) - set(model_keys(self.model))
        if unknown:
            raise UnknownKeyError(f"model.{sorted(unknown)[0]}", [f"model.{k}" for k in model_keys(self.model)])
        self.model_config(vocab_size=None)  # the model's own checks, now rather than later

    def model_config(self, vocab_size: int | None, base: Any = None) -> Any:
        """The model's config: ``base`` (default: the preset) with the overrides, the dtypes
        and ``vocab_size`` (None: keep the base's)."""
        base = model_family(self.model).presets[self.model] if base is None else base
        fields = {**self.model_overrides, "dtype": self.dtype, "param_dtype": self.param_dtype}
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        return dataclasses.replace(base, **fields)


# ---------------------------------------------------------------------------------------------
# Presets


def default() -> ExperimentConfig:
    """~5 minutes on a 2-core CPU: ``jaxtok pretrain``."""
    return ExperimentConfig(
        name="default",
        model="llama-tiny",
        # unrolled: 8-10% faster train steps than scan at 4 layers (benchmarks/train_step.py)
        model_overrides=dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=768,
                             max_seq_len=1024, layer_loop="unrolled"),
        tokenizer_vocab=4096,
        data=DataConfig(seq_len=256, global_batch=8, bos_token=BOS, cache_dir=str(cache_dir() / "packed")),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1),
        steps=300, eval_every=100, eval_batches=16, checkpoint_every=100,
        run_dir="runs/default", dtype="bfloat16",
    )


def tiny() -> ExperimentConfig:
    """Seconds: a 2-layer d=64 Llama, a 512-token BPE, the first 40 stdlib files (~1 MB)."""
    return ExperimentConfig(
        name="tiny",
        model="llama-tiny",
        tokenizer_vocab=512, tokenizer_documents=40,
        data=DataConfig(seq_len=64, global_batch=8, bos_token=BOS, max_documents=40),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1),
        steps=20, eval_every=10, eval_batches=2, checkpoint_every=10,
        run_dir="runs/tiny",
    )


def tokenformer_tiny() -> ExperimentConfig:
    """The tiny run with a TokenFormer through the same trainer."""
    return dataclasses.replace(tiny(), name="tokenformer-tiny", model="tokenformer-tiny",
                               run_dir="runs/tokenformer-tiny")


def smollm2_continue() -> ExperimentConfig:
    """Continued pretraining of SmolLM2-135M on the stdlib corpus, with its own tokenizer."""
    return ExperimentConfig(
        name="smollm2-continue",
        model="smollm2-135m", pretrained="smollm2-135m", tokenizer="pretrained",
        data=DataConfig(seq_len=256, global_batch=8, bos_token=BOS, cache_dir=str(cache_dir() / "packed")),
        optimizer=OptimizerConfig(lr=3e-5, warmup_steps=10, weight_decay=0.0, end_lr_fraction=0.5),
        steps=50, eval_every=25, eval_batches=4, checkpoint_every=25,
        run_dir="runs/smollm2-continue",
    )


def mamba_tiny() -> ExperimentConfig:
    """The tiny run with a Mamba-1 LM (selective scan): ``jaxtok pretrain --config mamba-tiny``."""
    return dataclasses.replace(tiny(), name="mamba-tiny", model="mamba-tiny", run_dir="runs/mamba-tiny")


def mamba2_tiny() -> ExperimentConfig:
    """The tiny run with a Mamba-2 LM (SSD): ``jaxtok pretrain --config mamba2-tiny``."""
    return dataclasses.replace(tiny(), name="mamba2-tiny", model="mamba2-tiny", run_dir="runs/mamba2-tiny")


def tokenunify_tiny() -> ExperimentConfig:
    """Seconds: a 2-layer d=32 bidirectional/causal Mamba on 8x32x32 crops (2x8x8 patches) of
    one synthetic EM-like volume, all three TokenUnify objectives summed:
    ``jaxtok pretrain --config tokenunify-tiny`` (``--set data.volume=stack.tif`` for your own)."""
    return ExperimentConfig(
        name="tokenunify-tiny", model="vision-mamba-tiny",
        data=volumes.VolumeDataConfig(crop=(8, 32, 32), global_batch=4, synthetic_shape=(16, 64, 64),
                                      synthetic_volumes=1, eval_crops=4),
        objective=tokenunify.MixtureConfig(),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=2, weight_decay=0.05),
        steps=8, eval_every=4, eval_batches=1, checkpoint_every=4, run_dir="runs/tokenunify-tiny",
    )


def tokenunify_small() -> ExperimentConfig:
    """The CPU ablation's pretraining (``benchmarks/tokenunify.py``): a 4-layer d=96 Mamba on
    16x64x64 crops (4x8x8 patches, 256 tokens) of four synthetic 32x128x128 volumes."""
    return ExperimentConfig(
        name="tokenunify-small", model="vision-mamba-small",
        data=volumes.VolumeDataConfig(crop=(16, 64, 64), global_batch=8, synthetic_shape=(32, 128, 128),
                                      synthetic_volumes=4, eval_crops=8),
        objective=tokenunify.MixtureConfig(),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20, weight_decay=0.05),
        steps=300, eval_every=100, eval_batches=1, checkpoint_every=100, run_dir="runs/tokenunify-small",
    )


def byte_lm_tiny() -> ExperimentConfig:
    """Seconds: the word-pooled byte LM (d=64 word LM, d=32 byte stacks) on 64-word rows of the
    first 40 stdlib files: ``jaxtok pretrain --config byte-lm-tiny``."""
    return ExperimentConfig(
        name="byte-lm-tiny", model="byte-lm-tiny",
        data=words.WordDataConfig(seq_words=64, global_batch=8, max_documents=40),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1),
        steps=20, eval_every=10, eval_batches=2, checkpoint_every=10, run_dir="runs/byte-lm-tiny",
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "default": default,
    "tiny": tiny,
    "tokenformer-tiny": tokenformer_tiny,
    "smollm2-continue": smollm2_continue,
    "mamba-tiny": mamba_tiny,
    "mamba2-tiny": mamba2_tiny,
    "tokenunify-tiny": tokenunify_tiny,
    "tokenunify-small": tokenunify_small,
    "byte-lm-tiny": byte_lm_tiny,
}


def get_config(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# Overrides


class UnknownKeyError(ValueError):
    """An override names a key the config does not have."""

    def __init__(self, key: str, valid: Iterable[str]):
        super().__init__(f"unknown config key {key!r}; valid keys: {', '.join(sorted(valid))}")


_SECTIONS = ("data", "objective", "optimizer")  # nested dataclasses settable as section.field
_NOT_SETTABLE = frozenset({"model_overrides", *_SECTIONS})


def _sections(config: ExperimentConfig) -> list[str]:
    return [s for s in _SECTIONS if getattr(config, s) is not None]


def valid_keys(config: ExperimentConfig) -> list[str]:
    """Every key ``--set`` accepts for ``config``."""
    top = [f.name for f in dataclasses.fields(config) if f.name not in _NOT_SETTABLE]
    nested = [f"{s}.{f.name}" for s in _sections(config) for f in dataclasses.fields(getattr(config, s))]
    return sorted(top + nested + [f"model.{k}" for k in model_keys(config.model)])


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_value(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float, bool, str, enums, ``X | None``,
    ``tuple[X, ...]`` from comma-separated items)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, key)
            except ValueError:
                continue
        raise ValueError(f"{key}: cannot read {text!r} as {hint}")
    if origin is tuple:
        return tuple(parse_value(item.strip(), args[0], key) for item in text.split(",") if item.strip())
    if hint is bool:
        if text.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(f"{key}: expected true or false, got {text!r}")
        return text.strip().lower() in _TRUE
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{key}: {text!r} is not one of {[m.value for m in hint]}") from None
    if hint is int:
        try:
            value = float(text)  # accepts 1e3 and 1_000
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {text!r}") from None
        if not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {text!r}")
        return int(value)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {text!r}") from None
    if hint is str:
        return text
    raise ValueError(f"{key}: values of type {hint} cannot be set from the command line")


def _parse_pairs(items: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad override {item!r}: expected key=value")
        pairs.append((key.strip(), text.strip()))
    return pairs


def apply_overrides(config: ExperimentConfig, items: Iterable[str]) -> ExperimentConfig:
    """``config`` with every ``key=value`` of ``items`` applied.

    ``model=`` goes first (it decides which ``model.*`` keys exist); the fields of each section
    are then replaced together, so ``data.source=text data.paths=a.txt`` is checked as a whole.
    """
    pairs = _parse_pairs(items)
    for key, text in pairs:
        if key == "model" and text != config.model:
            model_family(text)  # an unknown preset is named as such
            config = dataclasses.replace(config, model=text, model_overrides={})  # overrides of the old preset
    valid = set(valid_keys(config))
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"model": {}, **{s: {} for s in _SECTIONS}}
    owners = {"model": model_family(config.model).config_cls,
              **{s: type(getattr(config, s)) for s in _sections(config)}}
    for key, text in pairs:
        if key == "model":
            continue
        if key not in valid:
            raise UnknownKeyError(key, valid)
        section, _, field = key.partition(".")
        if not field:
            top[section] = parse_value(text, typing.get_type_hints(ExperimentConfig)[section], key)
        else:
            nested[section][field] = parse_value(text, typing.get_type_hints(owners[section])[field], key)
    sections = {s: dataclasses.replace(getattr(config, s), **fields) for s, fields in nested.items()
                if fields and s != "model"}
    overrides = {**config.model_overrides, **nested["model"]}
    return dataclasses.replace(config, **top, **sections, model_overrides=overrides)


def to_json(config: ExperimentConfig) -> dict[str, Any]:
    """A JSON-able dict of ``config`` (enums by value, tuples as lists)."""
    def clean(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return json.loads(json.dumps(clean(dataclasses.asdict(config))))


def _from_json_value(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return config_from_json(value, hint)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and hint is not str:
        return parse_value(value, hint, key)  # enums, "inf" floats, str | None
    return value


def config_from_json(data: Mapping[str, Any], cls: type = ExperimentConfig) -> Any:
    """The inverse of :func:`to_json` (for ``cls`` and its nested dataclasses); the classes of an
    experiment's ``data`` and ``objective`` sections are those of its model's family."""
    hints = typing.get_type_hints(cls)
    if cls is ExperimentConfig:
        family = model_family(data.get("model", ExperimentConfig.model))
        hints = {**hints, "data": family.data.config_cls, "objective": family.objective_cls}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"saved config has fields {sorted(unknown)} that {cls.__name__} lacks")
    return cls(**{k: None if v is None else _from_json_value(v, hints[k], k) for k, v in data.items()})


def saved_config_json(checkpoint_dir: Path) -> tuple[int, dict[str, Any]]:
    """``(step, config as JSON)`` of the newest checkpoint in ``checkpoint_dir`` whose config reads."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(checkpoint_dir) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                items = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            except Exception:  # noqa: BLE001 - a damaged step: restore_latest reports it later
                continue
            return step, items["config"]
    raise FileNotFoundError(f"no readable checkpoint in {checkpoint_dir}")


def saved_config(checkpoint_dir: Path) -> tuple[int, ExperimentConfig]:
    """``(step, config)`` of the newest checkpoint in ``checkpoint_dir`` whose config reads."""
    step, data = saved_config_json(checkpoint_dir)
    return step, config_from_json(data)

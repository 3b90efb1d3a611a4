"""The pretraining job: an experiment config in, a trained run directory out.

    jaxtok pretrain                                        # the `default` config (~5 min on CPU)
    jaxtok pretrain --config tiny --set steps=50 optimizer.lr=1e-3
    jaxtok pretrain --config tiny --mesh data=2,fsdp=2,tensor=2 --run-dir runs/x --resume
    python -m jaxtok.train.pretrain --config tokenformer-tiny

The run directory gets ``tokenizer.json``, ``checkpoints/``, ``metrics.jsonl``, TensorBoard
events and ``loss.png``. On several hosts (``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI or
Cloud TPU variables) ``jax.distributed.initialize()`` runs first and each host reads its own
share of every batch; the run directory must then be on a file system all hosts share.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxtok.data import load_documents
from jaxtok.sharding import make_mesh

from . import configs, flops
from .checkpoint import Checkpointer
from .observe import METRICS_FILE, PLOT_FILE, RunObserver, plot_metrics
from .trainer import LoopConfig, StepCallback, Trainer, TrainState, TrainTask, fit

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
# Config fields that may change between a run and its resumption without a warning.
# (a checkpoint restores onto any mesh, so the mesh is one of them)
_RESUMABLE_CHANGES = frozenset({"steps", "run_dir", "mesh", "progress", "eval_every", "eval_batches",
                                "checkpoint_every", "keep"})


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns: the run directory, the final state and a summary
    (steps, wall_s, first_loss, last_loss, tokens_per_s, mfu)."""

    run_dir: Path
    state: TrainState
    summary: dict[str, float]


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Multi-host


def is_multi_process_env(environ: Mapping[str, str]) -> bool:
    """Whether the environment describes a job of several processes."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if environ.get(var, "").isdigit() and int(environ[var]) > 1:
            return True
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment says this is one process of
    many (JAX reads the coordinator and cluster details itself). Returns whether it did."""
    environ = os.environ if environ is None else environ
    if not is_multi_process_env(environ):
        return False
    is_initialized = getattr(jax.distributed, "is_initialized", lambda: False)
    if not is_initialized():
        kwargs = {}
        if environ.get("JAX_NUM_PROCESSES", "").isdigit():
            kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
        if environ.get("JAX_PROCESS_ID", "").isdigit():
            kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
    return True


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


def train_bpe(documents, vocab_size: int, special_tokens: Sequence[str] = (configs.BOS,)) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on ``documents`` (all 256 bytes always in it)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def _new_tokenizer(config: configs.ExperimentConfig, pretrained: Any) -> Tokenizer:
    if config.tokenizer == "pretrained":
        return pretrained.tokenizer.hf
    if config.tokenizer == "bpe":
        data = dataclasses.replace(config.data, max_documents=config.tokenizer_documents)
        return train_bpe(load_documents(data, "train"), config.tokenizer_vocab)
    path = Path(config.tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (tokenizer= takes 'bpe', "
                                "'pretrained' or a tokenizer.json path)")
    return Tokenizer.from_file(str(path))


def prepare_tokenizer(config: configs.ExperimentConfig, run_dir: Path, pretrained: Any = None) -> Tokenizer:
    """The run's tokenizer: ``run_dir/tokenizer.json`` if present (a resumed run keeps its
    vocabulary), else made as the config says and written there by process 0."""
    path = run_dir / TOKENIZER_FILE
    if not path.exists():
        if jax.process_index() == 0:
            tokenizer = _new_tokenizer(config, pretrained)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tokenizer.save(str(tmp))
            os.replace(tmp, path)  # never a half-written tokenizer.json
        _barrier("jaxtok-tokenizer")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def model_vocab_size(tokenizer: Tokenizer, multiple: int = 128) -> int:
    """The tokenizer's vocabulary rounded up, so the vocab axis splits evenly on a mesh."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return -(-size // multiple) * multiple


def build_task(config: configs.ExperimentConfig, tokenizer: Tokenizer | None, pretrained: Any = None
               ) -> tuple[TrainTask, Any, Any]:
    """``(task, initial params or None, model config)`` for the config's model family (its
    ``task`` builder; the vocabulary comes from the tokenizer where the family has one)."""
    family = configs.model_family(config.model)
    if pretrained is not None:
        model_config = config.model_config(vocab_size=None, base=pretrained.config)
        needed = tokenizer.get_vocab_size(with_added_tokens=True)
        if needed > model_config.vocab_size:
            raise ValueError(f"the tokenizer has {needed} tokens but {config.pretrained} has only "
                             f"{model_config.vocab_size}")
        params = pretrained.params
    else:
        vocab = model_vocab_size(tokenizer) if family.data.uses_tokenizer else None
        model_config = config.model_config(vocab_size=vocab)
        params = None
    task = family.task(family.module_cls(model_config), config)
    if config.trainable == "embeddings":
        task = dataclasses.replace(task, trainable=embeddings_only(model_config))
    return task, params, model_config


def embeddings_only(model_config: Any):
    """``TrainTask.trainable`` for the embedding matrices of ``model_config``'s family (where
    tokenizer transfer registered them)."""
    from jaxtok.transfer.api import EMBEDDING_SLOTS

    slots = EMBEDDING_SLOTS.get(type(model_config))
    if slots is None:
        raise ValueError(f"trainable=embeddings: no embedding matrices registered for {type(model_config).__name__}")
    names = set(slots.names(model_config).values())
    return lambda path: path[0] in names


def _load_pretrained(config: configs.ExperimentConfig) -> Any:
    if config.pretrained is None:
        return None
    from jaxtok.models.registry import load_pretrained_lm

    return load_pretrained_lm(config.pretrained, dtype=config.dtype, param_dtype=config.param_dtype)


# ---------------------------------------------------------------------------------------------
# Resume


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's config and the current one."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def restore_or_init(trainer: Trainer, checkpointer: Checkpointer, config: configs.ExperimentConfig, data: Any,
                    *, resume: bool, params: Any = None) -> TrainState:
    """The latest good checkpoint (with ``resume``; the data iterator is set to continue
    where it stopped) or a fresh state. Refuses to start afresh over existing checkpoints."""
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise ValueError(f"{checkpointer.directory} already holds checkpoints (latest step {latest}); "
                         "pass --resume to continue that run, or choose another --run-dir")
    if resume:
        restored = checkpointer.restore_latest(trainer.abstract_state)
        if restored is not None:
            changes = config_changes(restored.config, configs.to_json(config))
            if changes:
                _say("warning: the config differs from the checkpoint's: " + "; ".join(changes))
            if restored.data_state is not None and hasattr(data, "set_state"):
                data.set_state(restored.data_state)
            _say(f"resumed from step {restored.step} ({checkpointer.directory})")
            return restored.state
        _say(f"no usable checkpoint in {checkpointer.directory}; starting from step 0")
    return trainer.init_state(jax.random.key(config.seed), params=params)


# ---------------------------------------------------------------------------------------------
# The job


def run(config: configs.ExperimentConfig, *, resume: bool = False, devices: Sequence[Any] | None = None,
        callbacks: Sequence[StepCallback] = ()) -> RunResult:
    """Trains ``config`` in ``config.run_dir`` (see the module docstring)."""
    maybe_initialize_distributed()
    run_dir = Path(config.run_dir).absolute()
    _say(f"run dir: {run_dir}")
    mesh = make_mesh(config.mesh or None, devices)  # a mesh that does not fit fails before any work
    pipeline = configs.model_family(config.model).data
    pretrained = _load_pretrained(config)
    tokenizer = prepare_tokenizer(config, run_dir, pretrained) if pipeline.uses_tokenizer else None
    task, params, model_config = build_task(config, tokenizer, pretrained)
    trainer = Trainer(task, config.optimizer, mesh, total_steps=config.steps, seed=config.seed)
    data = pipeline.train(config, tokenizer)
    eval_batches = pipeline.evaluation(config, tokenizer)[: config.eval_batches] if config.eval_every else []
    vocab = getattr(model_config, "vocab_size", None)
    _say(f"model {config.model} ({type(model_config).__name__}" + (f", vocab {vocab}" if vocab else "")
         + f"), mesh {dict(mesh.shape)}, {len(eval_batches)} eval batches")
    loop = LoopConfig(steps=config.steps, eval_every=config.eval_every, checkpoint_every=config.checkpoint_every)
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep, config=configs.to_json(config)) as checkpointer:
        state = restore_or_init(trainer, checkpointer, config, data, resume=resume, params=params)
        tokens_per_step = pipeline.tokens_per_step(config)
        flops_per_token, peak = _mfu_terms(model_config, config, mesh)
        try:
            with RunObserver(run_dir, total_steps=config.steps, start_step=int(jax.device_get(state.step)),
                             tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, peak_flops=peak,
                             progress=config.progress) as observer:
                state = fit(trainer, state, data, loop, eval_batches=eval_batches, checkpointer=checkpointer,
                            observer=observer, callbacks=callbacks)
                summary = observer.summary()
        finally:
            if jax.process_index() == 0:
                plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE)  # also for a run that diverged
    _say(_summary_line(summary))
    _say(f"run dir: {run_dir}")
    return RunResult(run_dir=run_dir, state=state, summary=summary)


def _mfu_terms(model_config: Any, config: configs.ExperimentConfig, mesh: Any
               ) -> tuple[float | None, float | None]:
    """Training FLOPs per token and the peak FLOP/s of the mesh (None where either is unknown)."""
    count = configs.model_family(config.model).flops_per_token
    if count is None:
        return None, None
    flops_per_token = count(model_config, config)
    device = mesh.devices.flat[0]
    try:
        peak = flops.peak_flops(config.dtype, device)
    except ValueError as exc:
        _say(f"no MFU: {exc}")
        return flops_per_token, None
    # simulated CPU devices share one processor, whose probe is the whole machine's peak
    chips = 1 if device.platform == "cpu" else mesh.devices.size
    _say(f"MFU is against {chips} x {peak.flops_per_s / 1e12:.3g} TFLOP/s ({peak.source}); "
         f"{flops_per_token / 1e6:.3g} MFLOPs per token")
    return flops_per_token, chips * peak.flops_per_s


def enable_compilation_cache(directory: str | Path | None = None) -> None:
    """Keeps compiled programs on disk, so a resumed or repeated run skips most compilation;
    leaves a cache the user configured (``JAX_COMPILATION_CACHE_DIR``) alone."""
    if jax.config.jax_compilation_cache_dir:
        return
    from jaxtok.io.cache import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(directory or cache_dir() / "xla"))


def _summary_line(summary: Mapping[str, float]) -> str:
    parts = [f"{int(summary['steps'])} steps in {summary['wall_s']:.0f}s"]
    if "first_loss" in summary:
        parts.append(f"loss {summary['first_loss']:.3f} at the first step -> "
                     f"{summary['last_loss']:.3f} (mean of the last {int(summary['last_loss_steps'])} steps)")
    if "tokens_per_s" in summary:
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    if "mfu" in summary:
        parts.append(f"MFU {100 * summary['mfu']:.1f}%")
    return "done: " + ", ".join(parts)


def _holds_checkpoints(run_dir: Path) -> bool:
    directory = run_dir / CHECKPOINT_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def numbered_runs(base: str | Path) -> list[Path]:
    """``base``, ``base-2``, ``base-3`` ... that hold checkpoints, oldest (lowest number) first."""
    base = Path(base)
    found = {1: base} if _holds_checkpoints(base) else {}
    if base.parent.is_dir():
        for path in base.parent.glob(f"{base.name}-*"):
            suffix = path.name[len(base.name) + 1:]
            if suffix.isdigit() and int(suffix) >= 2 and _holds_checkpoints(path):
                found[int(suffix)] = path
    return [found[n] for n in sorted(found)]


def default_run_dir(base: str | Path, resume: bool) -> Path:
    """Where a run goes when no ``--run-dir`` is given: a new run never lands on an earlier one
    (``runs/default`` taken: ``runs/default-2``, then ``-3`` ...); ``--resume`` takes the latest."""
    runs = numbered_runs(base)
    if resume or not runs:
        return runs[-1] if runs else Path(base)
    last = runs[-1].name[len(Path(base).name) + 1:]
    new = Path(f"{base}-{int(last) + 1 if last.isdigit() else 2}")
    _say(f"{runs[-1]} already holds a run, so this one goes to {new} "
         "(`jaxtok pretrain --resume` continues the latest run)")
    return new


def config_from_args(name: str | None, overrides: Sequence[str] = (), *, mesh: str | None = None,
                     run_dir: str | None = None, resume: bool = False) -> configs.ExperimentConfig:
    """The preset ``name`` with ``--set`` overrides, then ``--mesh`` and ``--run-dir``.

    Without ``run_dir`` the run goes to the preset's directory, numbered when that already holds
    a run (:func:`default_run_dir`); with ``resume`` to the latest of those. An explicit
    ``run_dir`` that holds checkpoints is refused later unless ``resume`` is given.
    With no ``name`` a resumed run takes the config saved in its newest readable checkpoint (so
    ``jaxtok pretrain --run-dir DIR --resume`` continues exactly what DIR was training), and a new
    run takes the ``default`` preset.
    """
    base = None
    if name is None and resume:
        run_dir = str(run_dir or default_run_dir(configs.get_config("default").run_dir, resume=True))
        directory = Path(run_dir) / CHECKPOINT_DIR
        if directory.is_dir():
            step, base = configs.saved_config(directory)
            _say(f"config from the checkpoint at step {step} in {directory}")
    if base is None:
        base = configs.get_config(name or "default")
    config = configs.apply_overrides(base, overrides)
    extra = {"run_dir": str(run_dir or default_run_dir(config.run_dir, resume))}
    if mesh is not None:
        extra["mesh"] = mesh
    return dataclasses.replace(config, **extra)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxtok.train.pretrain ARGS`` = ``jaxtok pretrain ARGS``."""
    from jaxtok.cli import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""Progressive growth of a trained TokenFormer run: ``jaxtok grow``.

    jaxtok grow --from runs/tf-small --to runs/tf-grown \\
        --set model.qkv_tokens=64 model.proj_tokens=64 model.ffn_tokens=256 steps=200 optimizer.lr=1e-3
    jaxtok grow --from runs/tf-small --to runs/tf-grown --set model.ffn_tokens=256 --steps 200  # and train
    jaxtok grow --from runs/tf-small --to runs/tf-grown --set model.ffn_tokens=256 --mesh data=2,fsdp=2,tensor=2

The latest good checkpoint of ``--from`` is restored (its saved config says which model it is)
onto the mesh, every Pattention gets new key/value parameter tokens
(:mod:`jaxtok.models.growth`; ``--mode zero`` keeps the function, ``random`` does not,
``zero_keys`` keeps it and, unlike ``zero``, lets the new tokens learn: see :func:`grow_tree`), and
``--to`` receives ``tokenizer.json``, ``grow.json`` (provenance and the resume command) and a
step-0 checkpoint with the grown parameters, a fresh optimizer state and no data state (so the
schedule warms up again and the data iterator starts over). The new config keeps every field of
the old one except the token counts, the pinned τ counts (``model.*_tau_tokens``) and the
``--set`` overrides. Training continues with ``--steps N`` here, or with the ``jaxtok pretrain
... --resume`` command printed and stored in ``grow.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer

from jaxtok.models.growth import GROWTH_MODES, grow_params, grown_config
from jaxtok.models.tokenformer import TokenFormerConfig
from jaxtok.sharding import make_mesh

from . import configs, pretrain
from .checkpoint import Checkpointer
from .trainer import Trainer, TrainState

GROW_FILE = "grow.json"
MODES = (*GROWTH_MODES, "zero_keys")
GROWABLE_KEYS = ("model.qkv_tokens", "model.proj_tokens", "model.ffn_tokens")


@dataclasses.dataclass(frozen=True)
class GrowResult:
    """What :func:`grow` returns.

    Attributes:
      run_dir: the new run directory.
      config: its experiment config.
      from_step: the step of the checkpoint that was grown.
      old_model, new_model: model configs before and after growth.
      state: the step-0 train state that was saved (on the mesh).
      pretrain_args: ``jaxtok pretrain`` arguments that resume the new run (None when the config
        cannot be rebuilt from a preset and ``--set``).
    """

    run_dir: Path
    config: configs.ExperimentConfig
    from_step: int
    old_model: TokenFormerConfig
    new_model: TokenFormerConfig
    state: TrainState
    pretrain_args: list[str] | None


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# The `jaxtok pretrain` command that resumes a config


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _as_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def pretrain_args(config: configs.ExperimentConfig) -> list[str] | None:
    """``--config NAME --set ...`` arguments that rebuild ``config`` exactly (checked), or
    None when ``config.name`` is no preset or a value does not survive the command line."""
    if config.name not in configs.PRESETS:
        return None
    new = _flat(configs.to_json(config))
    base = _flat(configs.to_json(configs.get_config(config.name)))
    items = [f"model={config.model}"] if config.model != base["model"] else []
    for key, value in new.items():
        # run_dir comes from --run-dir; every model override is listed (model= may reset them)
        if key in ("model", "run_dir") or (base.get(key) == value and not key.startswith("model_overrides.")):
            continue
        items.append(f"{key.replace('model_overrides.', 'model.', 1)}={_as_text(value)}")
    try:
        rebuilt = pretrain.config_from_args(config.name, items, run_dir=config.run_dir)
    except ValueError:
        return None
    if configs.to_json(rebuilt) != configs.to_json(config):
        return None
    return ["--config", config.name, "--set", *items]


# ---------------------------------------------------------------------------------------------
# Growth


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """``--set`` items -> (new token counts by group, the other overrides)."""
    counts: dict[str, int] = {}
    rest = []
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        if key in GROWABLE_KEYS:
            counts[key.split(".")[1]] = configs.parse_value(text.strip(), int, key)
        elif key == "model" or key.startswith("model."):
            raise ValueError(f"{key} cannot change when growing; the model keys grow may set are "
                             f"{', '.join(GROWABLE_KEYS)} (τ stays fixed by itself)")
        else:
            rest.append(item)
    return counts, rest


def _new_config(old: configs.ExperimentConfig, old_model: TokenFormerConfig, overrides: Sequence[str],
                run_dir: Path, mesh: str) -> tuple[configs.ExperimentConfig, TokenFormerConfig]:
    counts, rest = _split_overrides(overrides)
    config = configs.apply_overrides(old, rest)  # refuses unknown keys
    new_model = grown_config(old_model, **counts)  # refuses shrinking
    if all(new_model.tokens(g) == old_model.tokens(g) for g in ("qkv", "proj", "ffn")):
        raise ValueError(f"nothing to grow: set at least one of {', '.join(GROWABLE_KEYS)} above "
                         f"its current value (qkv {old_model.qkv_tokens}, proj {old_model.proj_tokens}, "
                         f"ffn {old_model.ffn_tokens})")
    grown = {f"{g}_{kind}": getattr(new_model, f"{g}_{kind}") for g in ("qkv", "proj", "ffn")
             for kind in ("tokens", "tau_tokens")}
    config = dataclasses.replace(config, model_overrides={**config.model_overrides, **grown},
                                 run_dir=str(run_dir), mesh=mesh)
    return config, new_model


def _check_target(target: Path, source: Path) -> None:
    if target.resolve() == source.resolve():
        raise ValueError("--to must differ from --from")
    checkpoints = target / pretrain.CHECKPOINT_DIR
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise ValueError(f"{target} already holds checkpoints; refusing to overwrite it "
                         "(choose another --to or remove it)")


def _restore(source: Path, config: configs.ExperimentConfig, tokenizer: Tokenizer, mesh) -> tuple[Any, int]:
    """``(params on the mesh, step)`` of the latest good checkpoint."""
    task, _, _ = pretrain.build_task(config, tokenizer)
    trainer = Trainer(task, config.optimizer, mesh, total_steps=config.steps, seed=config.seed)
    with Checkpointer(source / pretrain.CHECKPOINT_DIR, keep=config.keep) as checkpointer:
        restored = checkpointer.restore_latest(trainer.abstract_state)
    if restored is None:
        raise FileNotFoundError(f"no usable checkpoint in {source / pretrain.CHECKPOINT_DIR}")
    return restored.state.params, restored.step


def grow_tree(params: Any, old_model: TokenFormerConfig, new_model: TokenFormerConfig, mode: str,
              rng: jax.Array) -> Any:
    """:func:`grow_params` plus ``zero_keys``: new keys 0 (GeLU(0) = 0 keeps the function, as
    ``zero`` does) but new values drawn as ``random`` draws them. Why: with keys AND values 0 every
    gradient of a new token is 0 (dL/dv = GeLU(0) = 0, dL/dk ∝ v = 0), so ``zero`` tokens never train."""
    if mode != "zero_keys":
        return grow_params(params, old_model, new_model, mode, rng)
    zero = grow_params(params, old_model, new_model, "zero", rng)
    drawn = grow_params(params, old_model, new_model, "random", rng)
    return jax.tree_util.tree_map_with_path(
        lambda path, z, r: r if jax.tree_util.keystr(path).endswith("['value_tokens']") else z, zero, drawn)


def _grown_state(trainer: Trainer, params: Any, old_model: TokenFormerConfig, new_model: TokenFormerConfig,
                 mode: str, rng: jax.Array) -> TrainState:
    """The grown parameters and a fresh optimizer state, written straight onto the new
    shardings (no host copy: works for models larger than one device)."""
    shardings = trainer.state_shardings
    with jax.set_mesh(trainer.mesh):
        params = jax.jit(lambda p, r: grow_tree(p, old_model, new_model, mode, r),
                         out_shardings=shardings.params)(params, rng)
        opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def _write_record(target: Path, record: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:
        (target / GROW_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def grow(source: str | Path, target: str | Path, overrides: Sequence[str] = (), *, mode: str = "zero",
         seed: int = 0, mesh: str | None = None, devices: Sequence[Any] | None = None) -> GrowResult:
    """Grows the TokenFormer of run ``source`` into the new run ``target`` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown growth mode {mode!r}; valid: {MODES}")
    source, target = Path(source).absolute(), Path(target).absolute()
    _check_target(target, source)
    _, old = configs.saved_config(source / pretrain.CHECKPOINT_DIR)
    family = configs.model_family(old.model)
    if family.config_cls is not TokenFormerConfig:
        raise ValueError(f"{source} trained {old.model!r} ({family.config_cls.__name__}); only "
                         "TokenFormer runs can grow")
    if not (source / pretrain.TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{source / pretrain.TOKENIZER_FILE} is missing")
    tokenizer = Tokenizer.from_file(str(source / pretrain.TOKENIZER_FILE))
    _, _, old_model = pretrain.build_task(old, tokenizer)
    mesh_text = old.mesh if mesh is None else mesh
    config, new_model = _new_config(old, old_model, overrides, target, mesh_text)  # checks before any work
    device_mesh = make_mesh(mesh_text or None, devices)
    params, from_step = _restore(source, old, tokenizer, device_mesh)
    task, _, built = pretrain.build_task(config, tokenizer)
    assert built == new_model, "the new experiment config must describe the grown model"
    trainer = Trainer(task, config.optimizer, device_mesh, total_steps=config.steps, seed=config.seed)
    state = _grown_state(trainer, params, old_model, new_model, mode, jax.random.key(seed))
    target.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        shutil.copyfile(source / pretrain.TOKENIZER_FILE, target / pretrain.TOKENIZER_FILE)
    with Checkpointer(target / pretrain.CHECKPOINT_DIR, keep=config.keep,
                      config=configs.to_json(config)) as checkpointer:
        checkpointer.save(0, state, data_state=None)  # no data state: the iterator starts over
    args = pretrain_args(config)
    _write_record(target, {
        "from": str(source), "from_step": from_step, "mode": mode, "seed": seed,
        "old_model": dataclasses.asdict(old_model), "new_model": dataclasses.asdict(new_model),
        "old_params": old_model.num_params(), "new_params": new_model.num_params(),
        "pretrain_command": None if args is None else _command(args, target),
    })
    return GrowResult(run_dir=target, config=config, from_step=from_step, old_model=old_model,
                      new_model=new_model, state=state, pretrain_args=args)


def _command(args: Sequence[str], target: Path) -> str:
    return shlex.join(["jaxtok", "pretrain", *args, "--run-dir", str(target), "--resume"])


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtok grow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="run directory of a TokenFormer run")
    parser.add_argument("--to", dest="target", required=True, help="new run directory (must hold no checkpoints)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="model.qkv_tokens/proj_tokens/ffn_tokens=N and other overrides (steps=, optimizer.lr=)")
    parser.add_argument("--mode", default="zero", choices=MODES,
                        help="zero: new tokens 0, function kept (new tokens get no gradient); random: fresh "
                             "init; zero_keys: new keys 0, values drawn (function kept, new tokens train)")
    parser.add_argument("--seed", type=int, default=0, help="draws of --mode random")
    parser.add_argument("--mesh", default=None, help="device mesh (default: the old run's), e.g. data=2,fsdp=2")
    parser.add_argument("--steps", type=int, default=None, help="then train the grown model up to this step")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxtok grow ARGS``; with ``--steps`` it goes on to train the new run."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = [*args.set, *([f"steps={args.steps}"] if args.steps is not None else [])]
    pretrain.enable_compilation_cache()
    result = grow(args.source, args.target, overrides, mode=args.mode, seed=args.seed, mesh=args.mesh)
    _say(f"grew {result.old_model.num_params():,} -> {result.new_model.num_params():,} parameters "
                  f"(step {result.from_step} of {Path(args.source)}, mode {args.mode}) into {result.run_dir}")
    if args.steps is not None:
        pretrain.run(result.config, resume=True)
    elif result.pretrain_args is not None:
        _say("continue with: " + _command(result.pretrain_args, result.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

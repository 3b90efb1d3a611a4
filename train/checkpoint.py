"""Checkpoints of a training run: Orbax ``CheckpointManager`` plus the checks Orbax leaves out.

A checkpoint at step ``n`` is the folder ``<directory>/<n>`` with four items:

* ``state``: the train state (step, params, optimizer state), written asynchronously;
* ``data``: the data iterator's state (JSON), so the run continues with the next batch;
* ``config``: the experiment config (JSON), for the record;
* ``meta``: the step and a *fingerprint* of every array of the state (JSON).

Orbax writes each step into ``<n>.orbax-checkpoint-tmp`` and renames it when complete, and drops
old steps (``keep``) only after a new one is committed, so a save that fails or is killed never
touches the checkpoints before it. What Orbax does not do is notice damage after the fact:
a flipped byte in a compressed chunk restores silently as wrong numbers, and removing index files
only sometimes raises. Hence the fingerprint (wrapping integer sums of each array's bits,
independent of how the array is sharded) checked on every restore. ``restore_latest`` walks back
from the newest step until one restores and checks out, moving each bad one aside to
``<n>.corrupt`` (kept for inspection; a later save of the same step would otherwise be skipped).

Restores go onto the shardings of the given abstract state, so a run saved on 8 devices resumes on
1 and the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of the existing ones could be read."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint restored with errors or with arrays that fail their fingerprint."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint.

    Attributes:
      step: the step it was saved at.
      state: the train state, on the shardings that were asked for.
      data_state: the data iterator's state (None if none was saved).
      config: the experiment config saved with it (a JSON dict).
    """

    step: int
    state: Any
    data_state: dict[str, Any] | None
    config: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 values (narrower types widened, wider ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> list[jax.Array]:
    def one(x):
        u = _as_uint32(x)
        mixed = (u ^ (u >> 16)) * jnp.uint32(0x45D9F3B)  # a second, nonlinear sum
        return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(mixed ^ (mixed >> 13), dtype=jnp.uint32)])

    # Integer sums wrap modulo 2**32 and are associative: the same for any sharding.
    return [one(x) for x in leaves]


def fingerprint(tree: Any) -> dict[str, list[int]]:
    """``{key path: [sum, mixed sum]}`` of every array leaf of ``tree``."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    sums = jax.device_get(_fingerprint_arrays(list(leaves)))
    return {jax.tree_util.keystr(p): [int(v) for v in np.asarray(s)] for p, s in zip(paths, sums, strict=True)}


def _fingerprint_mismatch(expected: Mapping[str, list[int]], actual: Mapping[str, list[int]]) -> str | None:
    if set(expected) != set(actual):
        missing = sorted(set(expected) ^ set(actual))[:3]
        return f"the saved arrays differ from the expected ones (e.g. {missing})"
    bad = [k for k in expected if list(expected[k]) != list(actual[k])]
    if bad:
        return f"{len(bad)} array(s) fail their fingerprint, e.g. {bad[0]}"
    return None


# ---------------------------------------------------------------------------------------------
# The checkpointer


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Checkpointer:
    """Saves and restores train states of one run (see the module docstring).

    Attributes:
      directory: where the step folders live.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 config: Mapping[str, Any] | None = None, log: Callable[[str], None] = _stderr_log):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._config = dict(config or {})
        self._log = log
        self._last_saved: int | None = None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_state: Mapping[str, Any] | None = None) -> None:
        """Starts writing ``state`` as step ``step``; returns once the arrays are copied off
        the devices (the state may then be donated). Errors of an earlier asynchronous save are
        raised here as :class:`CheckpointError`."""
        if step in self.all_steps():
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; "
                                  "refusing to overwrite it")
        meta = {"step": step, "fingerprint": fingerprint(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"present": data_state is not None, "state": dict(data_state or {})}),
            config=ocp.args.JsonSave(self._config),
            meta=ocp.args.JsonSave(meta),
        )
        with self._reporting(f"saving checkpoint step {step}"):
            self._manager.save(step, args=args)
        self._last_saved = step

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        with self._reporting("finishing the last checkpoint save"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _reporting(self, what: str):
        """Turns Orbax's errors (often raised one save late, from a background thread) into a
        CheckpointError that says what failed and that the committed steps are intact."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as err:
            self._manager.reload()  # forget the step that failed
            raise CheckpointError(
                f"{what} in {self.directory} failed ({type(err).__name__}: {_first_line(err)}); "
                f"committed checkpoints are untouched: {self.all_steps()}") from err

    # -- reading ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def last_saved_step(self) -> int | None:
        """The newest step saved by this object or found on disk."""
        return self._last_saved if self._last_saved is not None else self.latest_step()

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restores step ``step`` onto the shardings of ``abstract_state`` (ShapeDtypeStructs
        with ``.sharding``) and checks every array against its fingerprint."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            items = self._manager.restore(step, args=args)
        except Exception as err:  # Orbax/TensorStore/JSON raise many types for a damaged folder
            raise CorruptCheckpointError(f"{type(err).__name__}: {_first_line(err)}") from err
        meta = items["meta"]
        problem = None
        if meta.get("step") != step:
            problem = f"its metadata says step {meta.get('step')}"
        else:
            problem = _fingerprint_mismatch(meta.get("fingerprint", {}), fingerprint(items["state"]))
        if problem is not None:
            raise CorruptCheckpointError(problem)
        data = items["data"]
        return Restored(step=step, state=items["state"], data_state=data["state"] if data.get("present") else None,
                        config=dict(items["config"]))

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest checkpoint that restores and checks out (None when there is none); each
        bad newer one is reported, moved aside and skipped."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state)
            except CorruptCheckpointError as err:
                moved = self._quarantine(step)
                older = [s for s in self.all_steps() if s < step]
                fallback = f"falling back to step {older[-1]}" if older else "no older checkpoint is left"
                self._log(f"checkpoint step {step} in {self.directory} is unusable ({err}); "
                          f"moved it to {moved.name}; {fallback}")
        return None

    def _quarantine(self, step: int) -> Path:
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}.corrupt-{n}", n + 1
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxtok-quarantine-{step}")
        self._manager.reload()
        return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().split(" See full TensorStore details")[0]  # drop the spec dump
    return text.splitlines()[0][:300] if text else "no message"

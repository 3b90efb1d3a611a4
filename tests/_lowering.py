"""Lowering a function for a TPU or a GPU on this CPU host, for the kernels' CI checks.

Two levels (see ../shared/FACTS.md):

* :func:`export_for` — ``jax.export`` for ``platforms=["tpu"]`` or ``["cuda"]`` in this process. No
  extra package: it checks that the function (with its Pallas kernels) lowers to the platform's
  StableHLO / Mosaic / Triton custom calls. For a Triton-lowered kernel it passes the disabled
  safety check the export needs; Mosaic GPU kernels need none.
* :func:`compile_for_tpu` — a real ahead-of-time compile for a described TPU slice with libtpu
  (Mosaic runs: VMEM limits, layouts, unsupported ops are errors). libtpu lives outside the test
  venv (``$JAXTOK_LIBTPU_DIR``, set by .ci/run) so that no other JAX process here tries to start a
  TPU; the compile therefore runs in a subprocess with that directory on ``PYTHONPATH``. The test
  skips when libtpu is absent.

Usage (a kernel test)::

    from _lowering import compile_for_tpu, export_for
    text = export_for(jax.jit(f), args, platform="cuda")            # StableHLO text
    report = compile_for_tpu(SNIPPET)   # SNIPPET defines `fn` (a jitted function) and `args`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import pytest
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for(fn: Any, args: Any, platform: str, *, triton: bool = False) -> str:
    """StableHLO text of ``fn`` (jitted or not) lowered for ``platform`` (``tpu`` or ``cuda``) with
    abstract ``args`` (a tuple of ``jax.ShapeDtypeStruct`` or arrays). ``triton``: the function
    holds Triton kernels (their custom call is not on export's stable list)."""
    if platform not in ("tpu", "cuda"):
        raise ValueError(f"platform must be 'tpu' or 'cuda', got {platform!r}")
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if triton else []
    exported = export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def libtpu_dir() -> str | None:
    """"" when libtpu is importable here, the ``$JAXTOK_LIBTPU_DIR`` holding it, or None."""
    try:
        import libtpu  # noqa: F401

        return ""
    except ImportError:
        path = os.environ.get("JAXTOK_LIBTPU_DIR")
        return path if path and (Path(path) / "libtpu").is_dir() else None


def tpu_env() -> dict[str, str] | None:
    """Environment for a subprocess that compiles for TPU on this host, or None without libtpu."""
    extra = libtpu_dir()
    if extra is None:
        return None
    # ALLOW_MULTIPLE_LIBTPU_LOAD: the two test workers may compile for TPU at the same time, and
    # libtpu otherwise refuses a second process (its lock file), which has nothing to guard here
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_ACCELERATOR_TYPE": "v5litepod-4", "XLA_FLAGS": "", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH", "")) if p)
    return env


_TPU_SCRIPT = """
import json
import jax
from jaxtok.train.aot import tpu_devices
devices = tpu_devices({topology!r})
with jax.default_device(devices[0]):  # some lowerings ask the default device (FACTS.md)
{snippet}
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    compiled = fn.lower(*args).compile()
    stats = compiled.memory_analysis()
    text = compiled.as_text() or ""
    print("LOWERED " + json.dumps({{
        "temp_size_in_bytes": int(getattr(stats, "temp_size_in_bytes", -1)),
        "argument_size_in_bytes": int(getattr(stats, "argument_size_in_bytes", -1)),
        "mosaic": "tpu_custom_call" in text or "custom-call" in text}}))
"""


def compile_for_tpu(snippet: str, *, topology: str = "v5e:2x2", timeout: float = 600) -> dict[str, Any]:
    """Compiles for one chip of a TPU ``topology`` in a subprocess; ``snippet`` (Python source) must
    define ``fn`` (a jitted function) and ``args`` (shapes: anything with ``.shape``/``.dtype``).
    Returns the compiled program's memory figures; skips the test without libtpu; fails with the
    subprocess's stderr when lowering or compiling fails."""
    env = tpu_env()
    if env is None:
        pytest.skip("libtpu not installed (pip install --target DIR libtpu; export JAXTOK_LIBTPU_DIR=DIR)")
    script = _TPU_SCRIPT.format(topology=topology, snippet=textwrap.indent(textwrap.dedent(snippet), "    "))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LOWERED ")]
    assert proc.returncode == 0 and lines, f"TPU compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("LOWERED "))

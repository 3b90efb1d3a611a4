"""Model FLOPs per token, the peak FLOP/s of the machine, and model FLOPs utilisation (MFU).

The count is the same for every model family, from its config (PaLM's appendix B convention):

    forward FLOPs per token  = 2 · N_matmul + 4 · L · W · T
    training FLOPs per token = 3 x forward  = 6 · N_matmul + 12 · L · W · T

* ``N_matmul`` (``config.matmul_params()``): parameters each token is multiplied by in a matrix
  product, i.e. every projection of every layer plus the output layer (counted even when it is
  tied to the input embedding, whose lookup itself costs nothing). For TokenFormer that is every
  Pattention's key and value tokens; norms, biases, rotary, softmax and GeLU are not counted.
* ``4 · L · W · T``: the two attention products (QKᵀ and AV, 2 · T · W each) of each of the L
  layers (``config.n_layers``), W = ``config.n_heads * config.head_dim`` the query width and T
  the context length, counted over the full context (no causal halving, as PaLM and Kaplan do).
* State-space families (Mamba) replace the attention term by ``config.mixer_flops_per_token``:
  the recurrence's three products per state element (dt·x ⊗ B, the decay multiply-add, C·h),
  ``6 · L · d_inner · d_state``, independent of T; conv taps count as matmul parameters.
* backward = 2 x forward (a product's two transposed products), hence training = 3 x forward.
  Recomputation under remat is *not* counted: MFU counts the model's FLOPs, not the hardware's.

MFU = tokens/s x training FLOPs per token / peak FLOP/s. The peak is stated, never guessed:

* TPU and GPU: the chip's published dense bf16 peak, looked up by ``device_kind``
  (``PUBLISHED_PEAKS``); float32 matmuls run at that rate on TPU (bf16 passes, JAX's default
  precision) and as TF32 on Ampere+ GPUs (``PUBLISHED_PEAKS_F32``).
* CPU: measured once by a matmul probe in the compute dtype (float32; bf16 inputs with float32
  accumulation, as ``jaxtok.nn.layers.matmul`` computes), jitted, 1024² to 4096², the best of
  all runs, cached in
  ``<jaxtok cache>/peak_flops.json`` per CPU model, dtype and thread count: these machines differ
  (an AMX Intel part does ~246 GFLOP/s f32, an AMD EPYC ~153). A probe taken under load from
  other processes reads low, which makes MFU read high: delete the cache entry to re-measure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp

PEAK_CACHE_FILE = "peak_flops.json"

# Dense bf16 FLOP/s per chip, from the vendors' data sheets (device_kind substring, lower case).
PUBLISHED_PEAKS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h200": 989e12,
    "h100": 989e12,  # SXM; the PCIe part is 756e12
    "a100": 312e12,
}
# float32 matmuls on GPUs: TF32 tensor cores (JAX's default matmul precision there).
PUBLISHED_PEAKS_F32: dict[str, float] = {"h200": 494.5e12, "h100": 494.5e12, "a100": 156e12}


class FlopsConfig(Protocol):
    """What a model config provides for :func:`model_flops_per_token` (LlamaConfig and
    TokenFormerConfig do; a family without token-token attention has ``n_heads = 0``)."""

    n_layers: int
    n_heads: int

    @property
    def head_dim(self) -> int: ...

    def matmul_params(self) -> int: ...


def model_flops_per_token(config: FlopsConfig, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token (formula in the module docstring); ``training=False`` gives the forward."""
    mixer = getattr(config, "mixer_flops_per_token", None)  # families without attention (Mamba)
    if mixer is not None:
        forward = 2 * config.matmul_params() + mixer(seq_len)
    else:
        forward = 2 * config.matmul_params() + 4 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return float(3 * forward if training else forward)


@dataclasses.dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and where it comes from (``published: <kind>`` or ``measured: <probe>``)."""

    flops_per_s: float
    source: str


def mfu(tokens_per_s: float, flops_per_token: float, peak: Peak | float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    peak_value = peak.flops_per_s if isinstance(peak, Peak) else float(peak)
    return tokens_per_s * flops_per_token / peak_value


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 4096),
                         repeats: int = 5) -> float:
    """Best FLOP/s of jitted square matmuls (each of ``sizes``, best of ``repeats``) with ``dtype``
    operands and float32 accumulation: the most the machine's matmul kernels reach."""
    best_rate = 0.0
    for size in sizes:
        a = jnp.ones((size, size), dtype)
        b = jnp.ones((size, size), dtype)
        product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        product(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            product(a, b).block_until_ready()
            best_rate = max(best_rate, 2 * size ** 3 / (time.perf_counter() - start))
    return best_rate


def published_peak(device_kind: str, dtype: str = "bfloat16") -> Peak | None:
    """The table's peak for a TPU/GPU ``device_kind`` (None if it is not in the table)."""
    kind = device_kind.lower()
    table = PUBLISHED_PEAKS_F32 if jnp.dtype(dtype) == jnp.float32 else {}
    for name in sorted({**PUBLISHED_PEAKS, **table}, key=len, reverse=True):  # longest match first
        if name in kind:
            value = table.get(name, PUBLISHED_PEAKS.get(name))
            return Peak(value, f"published: {device_kind} {'tf32' if name in table else 'bf16'} dense")
    return None


def peak_flops(dtype: str = "float32", device: jax.Device | None = None, *, cache: bool = True,
               refresh: bool = False) -> Peak:
    """Peak FLOP/s of ``device`` (default: the first device) for matmuls in ``dtype``.

    TPU/GPU: :func:`published_peak` (ValueError for a kind not in the table). CPU: the matmul
    probe, cached per CPU model, dtype and thread count in the jaxtok cache directory;
    ``refresh`` measures again and keeps the higher of the two (a probe under load reads low).
    """
    device = jax.devices()[0] if device is None else device
    if device.platform != "cpu":
        peak = published_peak(device.device_kind, dtype)
        if peak is None:
            raise ValueError(f"no published peak for {device.device_kind!r}; add it to PUBLISHED_PEAKS")
        return peak
    key = f"{cpu_model()} | {jnp.dtype(dtype).name} | {len(os.sched_getaffinity(0))} threads"
    path = _cache_path()
    stored = _read_cache(path) if cache else {}
    if key not in stored or refresh:
        stored[key] = max(measure_matmul_flops(dtype), stored.get(key, 0.0))
        if cache:
            _write_cache(path, stored)
    return Peak(stored[key], f"measured: {key}, matmul probe")


def _cache_path() -> Path:
    from jaxtok.io.cache import cache_dir

    return cache_dir() / PEAK_CACHE_FILE


def _read_cache(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_cache(path: Path, values: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(values, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement

"""Where one SmolLM2-135M decode step spends its time, op by op, as XLA:CPU runs it.

    python benchmarks/decode_profile.py [--dtype bfloat16] [--cache-len 640] [--steps 10]

The step is what ``generate`` runs per new token (unrolled layer loop, per-layer weights, one
token, the KV cache donated so its update is in place). It runs ``--steps`` times under
``jax.profiler.trace``; XLA:CPU records one event per executed thunk, which this script reads
back from the Perfetto trace and groups: each matrix product by the weight it reads (with the
bytes it reads and the bandwidth that gives), the rest by fusion kind. The read roof is measured
in the same run as in benchmarks/smollm2_forward.py.

Ends with ``RESULT`` giving the step time, the share of products, and the products' bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
from smollm2_forward import cpu_description, read_bandwidth

from jaxtok.models.llama import KVCache, Llama
from jaxtok.models.registry import load_pretrained_lm
from jaxtok.nn.layers import split_layers


def thunk_events(trace_dir: str) -> list[dict]:
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    # thunk events are named after their HLO instruction; runtime/Python frames are not
    runtime = ("ThunkExecutor", "$", "Slinky", "Pjit", "Common", "Parse", "end:", "Handle", "Allocate")
    return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(runtime)]


def product_names(hlo: str) -> dict[str, str]:
    """Product fusion name -> what it computes, from its metadata: ``<module> <einsum>``, the
    module a layer's weight name (``q``, ``gate``, ...) or ``Llama`` (output layer, attention)."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*%(\S+) = \S+ fusion\((.*?)\), kind=kCustom.*op_name=\"([^\"]+)\"", line)
        if m:
            parts = m.group(3).split("/")
            out[m.group(1)] = " ".join(parts[-3:-1]) if len(parts) >= 3 else parts[-1]
    return out


def op_times(run, names: dict[str, str], steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Runs ``run()`` ``steps`` times under the profiler: (ms per step, calls) per op group, the
    products named by ``names`` (see :func:`product_names`), the rest by their fusion kind."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        events = thunk_events(trace_dir)
    groups: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for e in events:
        base = re.sub(r"\.\d+$", "", e["name"])
        key = f"product {names[e['name']]}" if e["name"] in names else base
        key = "products without metadata" if key.startswith(("ynn_fusion", "dot")) else key
        groups[key] += e["dur"] / steps / 1e3
        counts[key] += 1
    return groups, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--cache-len", type=int, default=640, help="KV cache slots (the decode benchmark's: 512 + 128)")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(f"CPU: {cpu_description()}; jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
    bandwidth = read_bandwidth(1024)
    loaded = load_pretrained_lm("smollm2-135m", dtype=args.dtype, param_dtype=args.dtype)
    config = dataclasses.replace(loaded.config, layer_loop="unrolled")
    model, params = Llama(config), split_layers(loaded.params)

    def step(p, token, cache):
        out = model.apply({"params": p}, token, cache=cache)
        return jnp.argmax(out.logits[:, -1], -1), out.cache

    step = jax.jit(step, donate_argnums=2)
    token = jnp.ones((1, 1), jnp.int32)
    cache = KVCache.create(config, 1, args.cache_len).replace(end=jnp.asarray(args.cache_len // 2, jnp.int32))
    names = product_names(step.lower(params, token, cache).compile().as_text())
    for _ in range(3):
        _, cache = jax.block_until_ready(step(params, token, cache))

    def run():
        nonlocal cache
        _, cache = jax.block_until_ready(step(params, token, cache))

    groups, counts = op_times(run, names, args.steps)
    total = sum(groups.values())
    itemsize = jnp.dtype(args.dtype).itemsize
    attn_q = config.d_model * config.n_heads * config.head_dim
    attn_kv = config.d_model * config.n_kv_heads * config.head_dim
    mlp = config.d_model * config.d_ff
    weight_bytes = {  # per call of each named product: the weight it reads
        "q": attn_q, "o": attn_q, "k": attn_kv, "v": attn_kv, "gate": mlp, "up": mlp, "down": mlp,
        "Llama btd,vd->btv": config.d_model * config.vocab_size}
    print(f"\n{args.dtype} decode step, cache {args.cache_len} slots: {total:.2f} ms of thunks per step "
          f"(read roof {bandwidth / 1e9:.1f} GB/s)")
    products_ms = products_bytes = 0.0
    for key, ms in sorted(groups.items(), key=lambda kv: -kv[1])[:16]:
        calls = counts[key] / args.steps
        line = f"{ms:7.2f} ms {ms / total:6.1%}  {calls:5.0f} calls  {key}"
        layer = key.removeprefix("product ")
        layer = layer if layer in weight_bytes else layer.split()[0]
        if layer in weight_bytes:
            nbytes = weight_bytes[layer] * itemsize * calls
            line += f"  ({nbytes / ms / 1e6:.1f} GB/s over its weights)"
            products_ms, products_bytes = products_ms + ms, products_bytes + nbytes
        print(line)
    print(f"RESULT step_ms={total:.2f} products_share={products_ms / total:.2f} "
          f"products_gbs={products_bytes / products_ms / 1e6:.1f} roof_gbs={bandwidth / 1e9:.1f}")


if __name__ == "__main__":
    main()

"""The matrix-vector products of one SmolLM2-135M decode step alone, jax against torch: how close
each framework's CPU kernels come to the machine's read bandwidth for exactly these shapes.

    python benchmarks/decode_matvec.py [--rows 1] [--repeats 20]

A decode step multiplies one token's activations by every weight matrix once: per layer q, o
(576x576), k, v (576x192), gate, up (576x1536), down (1536x576), 30 layers, and the tied output
layer (576x49152): 134M weights, 538 MB in float32, 269 MB in bf16, more than the last-level
cache, so the step is a pass over memory. Here the same products run with random weights and no
attention, norms or cache: what is left is the kernels' own speed. jax: ``x @ w`` jitted with
float32 accumulation (``preferred_element_type``), for bf16 also jaxtok's two-row form (the
single row duplicated, see ``jaxtok.nn.layers.matmul``); torch: ``x @ w`` with ``torch.no_grad``.
The read bandwidth is measured in the same run, as benchmarks/smollm2_forward.py does (row sums
over 1 GiB of float32; column sums of the same buffer read only ~16 GB/s here, so the form matters).

Ends with ``RESULT`` giving each variant's fraction of the read roof.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from smollm2_forward import read_bandwidth  # the same roof as the decode benchmark's

D, FFN, Q, KV, VOCAB, LAYERS = 576, 1536, 576, 192, 49152, 30
SHAPES = [(D, Q), (D, KV), (D, KV), (Q, D), (D, FFN), (D, FFN), (FFN, D)] * LAYERS + [(D, VOCAB)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def jax_products(weights, rows: int, dtype, two_rows: bool):
    x = jnp.ones((rows, D), dtype)

    @jax.jit
    def step(x, weights):
        # every product reads its weight once; all outputs are returned, so XLA cannot narrow any
        outs = []
        for w in weights:
            inp = x[:, : w.shape[0]] if w.shape[0] <= D else jnp.tile(x, (1, 3))[:, : w.shape[0]]
            if two_rows:
                inp = jnp.concatenate([inp, inp], axis=0)
            outs.append(jnp.dot(inp, w, preferred_element_type=jnp.float32)[:rows])
        return outs

    return lambda: jax.block_until_ready(step(x, weights))


def torch_products(shapes, rows: int, dtype: str):
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    weights = [torch.randn(shape, dtype=tdtype) for shape in shapes]
    xs = {n: torch.ones((rows, n), dtype=tdtype) for n in {s[0] for s in shapes}}

    def run():
        with torch.no_grad():
            return [xs[w.shape[0]] @ w for w in weights]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="tokens per step (batch rows)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} threads, jax {jax.__version__}, "
          f"load {os.getloadavg()[0]:.1f}")
    bandwidth = read_bandwidth(1024)
    print(f"read bandwidth (row sums over 1 GiB float32): {bandwidth / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    results = {}
    for dtype in ("float32", "bfloat16"):
        weights = [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in SHAPES]
        nbytes = sum(w.nbytes for w in weights)
        variants = {"jax": jax_products(weights, args.rows, dtype, two_rows=False)}
        if dtype == "bfloat16":
            variants["jax_two_rows"] = jax_products(weights, args.rows, dtype, two_rows=True)
        try:
            variants["torch"] = torch_products(SHAPES, args.rows, dtype)
        except ImportError:
            print("torch not installed: jax only")
        del weights
        for name, fn in variants.items():
            best, median = best_time(fn, args.repeats)
            roof = nbytes / bandwidth / best
            results[f"{name}_{'f32' if dtype == 'float32' else 'bf16'}"] = roof
            print(f"{dtype:9} {name:13} {nbytes / 1e6:4.0f} MB of weights: best {best * 1e3:6.1f} ms, median "
                  f"{median * 1e3:6.1f} ms -> {nbytes / best / 1e9:5.1f} GB/s = {roof:.0%} of the read roof")
    print("RESULT " + " ".join(f"roof_{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()

"""Speed and memory of every scan path against SEQUENTIAL, and against the ``mamba2-jax`` package.

    python benchmarks/ssm_scan.py                          # L = 1024, 4096, 16384
    python benchmarks/ssm_scan.py --lengths 1024,4096 --repeats 2
    python benchmarks/ssm_scan.py --lengths "" --lm-steps 60   # only the equal-FLOPs LM comparison

Shapes (batch 1): Mamba-1 d_inner 1536, d_state 16 (x as 1536 width-1 heads, per-state A);
Mamba-2 24 heads x 64, d_state 64, one B/C group, chunk 256. Each path is timed forward and
forward+backward (gradient of a scalar of y and the final state), jitted, best of ``--repeats``
after a warm-up; memory is XLA's compile-time temp buffer size. PALLAS runs in interpret mode on
CPU (a correctness path here, not a speed path), so it is left out of CPU timings. ASSOCIATIVE
is skipped where its materialised states would pass ``--max-assoc-gb``.

mamba2-jax (``mamba2_jax.modeling.ssd_forward``, pure JAX SSD) runs on the same Mamba-2 shapes as
the outside anchor (it applies softplus to dt itself; we time softplus + our scan likewise).

Equal-FLOPs LM comparison (``--lm-steps N``, 0: skipped): the ``default`` experiment's Llama
(d 256, 4 layers) trains N steps on the embedded corpus, then ``mamba-tiny`` (Mamba-1, d 64, 2
layers) on the same data, tokenizer and optimizer for as many steps as give the same training
FLOPs (``jaxtok.train.flops``: 6 x matmul params + the mixer term, per token). Eval bits per byte
against training FLOPs goes to ``--lm-dir``/bpb_vs_flops.png; ``mamba_bpb``/``llama_bpb`` are
the last evaluations, at the common FLOPs budget.

RESULT keys: speedup_4096 (Mamba-2 fwd+bwd, AUTO over SEQUENTIAL at L = 4096),
mamba1_fwd_speedup_4096, vs_mamba2_jax (mamba2-jax fwd+bwd time / ours at 4096, > 1: ours faster),
mamba_bpb, llama_bpb (nan where that part did not run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxtok.nn.ssm import ssm_scan
from jaxtok.train.flops import cpu_model
from jaxtok.train.observe import save_figure


def shapes(kind, t):
    if kind == "mamba1":
        return dict(h=1536, p=1, g=1, n=16, scalar=False)
    return dict(h=24, p=64, g=1, n=64, scalar=True)


def make(kind, t, seed=0):
    s = shapes(kind, t)
    k = jax.random.split(jax.random.key(seed), 5)
    h, p, g, n = s["h"], s["p"], s["g"], s["n"]
    x = jax.random.normal(k[0], (1, t, h, p))
    dt_raw = jax.random.normal(k[1], (1, t, h)) - 2.0
    A = -jnp.exp(jax.random.normal(k[2], (h,) if s["scalar"] else (h, n)))
    B = jax.random.normal(k[3], (1, t, g, n))
    C = jax.random.normal(k[4], (1, t, g, n))
    return x, dt_raw, A, B, C


def ours(impl):
    def fwd(x, dt_raw, A, B, C):
        return ssm_scan(x, jax.nn.softplus(dt_raw), A, B, C, impl=impl)
    return fwd


def theirs():
    from mamba2_jax.modeling import ssd_forward

    def fwd(x, dt_raw, A, B, C):
        h = x.shape[2]
        Bh, Ch = (jnp.broadcast_to(m, (*m.shape[:2], h, m.shape[-1])) for m in (B, C))
        return ssd_forward(x, dt_raw, A, Bh, Ch, 256, jnp.zeros((h,)), jnp.zeros((h,)), 0.0, float("inf"),
                           return_final_states=True)
    return fwd


def with_grad(fwd):
    def loss(*args):
        y, last = fwd(*args)
        return jnp.sum(jnp.sin(y)) + jnp.sum(last)
    return jax.grad(loss, argnums=(0, 1, 3, 4))


def measure(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best, temp


def lm_compare(llama_steps: int, out_dir: Path) -> tuple[float, float]:
    """Final eval bits per byte of the Llama and the Mamba at equal training FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxtok.train import configs, pretrain, read_metrics
    from jaxtok.train.flops import model_flops_per_token

    base = configs.default()
    # a short run: warm up over its first tenth (the default's 30 steps are for 300)
    llama = configs.apply_overrides(base, [f"run_dir={out_dir / 'llama'}", f"steps={llama_steps}",
                                           f"eval_every={max(1, llama_steps // 4)}", "progress=false", "mesh=",
                                           f"optimizer.warmup_steps={max(1, llama_steps // 10)}"])
    tokenizer = pretrain.prepare_tokenizer(llama, Path(llama.run_dir))
    vocab = pretrain.model_vocab_size(tokenizer)
    seq = base.data.seq_len
    per_token = {"llama": model_flops_per_token(llama.model_config(vocab), seq)}
    mamba = dataclasses.replace(llama, name="mamba-tiny-vs-default", model="mamba-tiny", model_overrides={},
                                run_dir=str(out_dir / "mamba"))
    per_token["mamba"] = model_flops_per_token(mamba.model_config(vocab), seq)
    mamba_steps = max(1, round(llama_steps * per_token["llama"] / per_token["mamba"]))
    mamba = dataclasses.replace(mamba, steps=mamba_steps, eval_every=max(1, mamba_steps // 4),
                                optimizer=dataclasses.replace(
                                    mamba.optimizer, warmup_steps=round(mamba.optimizer.warmup_steps
                                                                        * mamba_steps / llama_steps)))
    Path(mamba.run_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(llama.run_dir) / pretrain.TOKENIZER_FILE, Path(mamba.run_dir) / pretrain.TOKENIZER_FILE)
    tokens_per_step = base.data.global_batch * seq
    print(f"equal FLOPs: llama {per_token['llama'] / 1e6:.2f} MFLOPs/token x {llama_steps} steps, "
          f"mamba-tiny {per_token['mamba'] / 1e6:.2f} MFLOPs/token x {mamba_steps} steps "
          f"({tokens_per_step} tokens a step, vocab {vocab})", flush=True)
    final, fig = {}, plt.figure(figsize=(5, 3.5))
    for name, config in (("llama", llama), ("mamba", mamba)):
        start = time.perf_counter()
        pretrain.run(config)
        evals = [r for r in read_metrics(Path(config.run_dir) / "metrics.jsonl") if r["split"] == "eval"]
        flops = [r["step"] * tokens_per_step * per_token[name] for r in evals]
        plt.plot(flops, [r["bpb"] for r in evals], "o-", label=f"{name} ({config.model})")
        final[name] = evals[-1]["bpb"]
        print(f"{name}: {config.steps} steps in {time.perf_counter() - start:.0f} s, eval bpb "
              + ", ".join(f"{r['bpb']:.3f}@{r['step']}" for r in evals), flush=True)
    plt.xscale("log")
    plt.xlabel("training FLOPs")
    plt.ylabel("eval bits per byte")
    plt.legend()
    plt.tight_layout()
    save_figure(fig, out_dir / "bpb_vs_flops.png", dpi=120)
    print(f"plot: {out_dir / 'bpb_vs_flops.png'}")
    return final["mamba"], final["llama"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-assoc-gb", type=float, default=2.0)
    parser.add_argument("--skip-sequential-above", type=int, default=1 << 30)
    parser.add_argument("--kinds", default="mamba2,mamba1", help="which shapes: mamba2, mamba1 or both")
    parser.add_argument("--lm-steps", type=int, default=0, help="Llama steps of the equal-FLOPs comparison (0: skip)")
    parser.add_argument("--lm-dir", default="runs/ssm_lm_compare")
    args = parser.parse_args()
    print(f"cpu: {cpu_model()}, {len(os.sched_getaffinity(0))} threads, jax {jax.__version__}")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results = {}
    for t in (int(v) for v in args.lengths.split(",") if v):
        for kind in args.kinds.split(","):
            data = make(kind, t)
            s = shapes(kind, t)
            state_gb = 4 * t * s["h"] * s["p"] * s["n"] / 1e9
            paths = {"sequential": ours("sequential"), "chunked": ours("chunked"), "auto": ours("auto")}
            if state_gb * 3 <= args.max_assoc_gb:
                paths["associative"] = ours("associative")
            if kind == "mamba2":
                try:
                    paths["mamba2-jax"] = theirs()
                except ImportError:
                    print("mamba2-jax not installed: pip install mamba2-jax")
            if t > args.skip_sequential_above:
                paths.pop("sequential")
            for name, fwd in paths.items():
                tf, mf = measure(fwd, data, args.repeats)
                tb, mb = measure(with_grad(fwd), data, args.repeats)
                results[(kind, t, name)] = (tf, tb)
                base = results.get((kind, t, "sequential"))
                ratio = ("" if base is None
                         else f"  x{base[0] / tf:5.2f} fwd  x{base[1] / tb:5.2f} fwd+bwd vs sequential")
                print(f"{kind} L={t:6d} {name:12s} fwd {tf * 1e3:9.1f} ms ({mf / 2**20:7.1f} MiB)  "
                      f"fwd+bwd {tb * 1e3:9.1f} ms ({mb / 2**20:7.1f} MiB){ratio}", flush=True)
    bpb = lm_compare(args.lm_steps, Path(args.lm_dir)) if args.lm_steps else (float("nan"),) * 2
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    def ratio(kind, a, b, which):
        try:
            return f"{results[(kind, 4096, a)][which] / results[(kind, 4096, b)][which]:.2f}"
        except KeyError:
            return "nan"

    print(f"RESULT speedup_4096={ratio('mamba2', 'sequential', 'auto', 1)} "
          f"mamba1_fwd_speedup_4096={ratio('mamba1', 'sequential', 'auto', 0)} "
          f"vs_mamba2_jax={ratio('mamba2', 'mamba2-jax', 'auto', 1)} mamba_bpb={bpb[0]:.4f} llama_bpb={bpb[1]:.4f}")


if __name__ == "__main__":
    main()

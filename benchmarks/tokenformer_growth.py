"""TokenFormer on the embedded stdlib corpus: (a) vs a Llama of about the same size, (b) growth
vs training the large model from scratch at a fixed FLOPs budget.

    /work/venv/bin/python benchmarks/tokenformer_growth.py [--steps 600] [--out runs/bench-growth]

(a) TokenFormer (d=128, 2 layers, qkv=proj=128, ffn=512 parameter tokens) and a Llama (d=128,
    2 layers, d_ff=512) of near-equal parameter count train on the same tokens for ``--steps``.
(b) The same large TokenFormer from scratch is the reference: its training FLOPs are the budget.
    A small TokenFormer (qkv=proj=64, ffn=256) trains ``--steps / 2`` steps, is grown to the
    large size and trains on for what is left of the budget; its result is the first evaluation
    at or below the scratch model's final bits per byte (or its last one). Grown twice from the
    same small checkpoint: ``zero`` (the issue's mode) and ``zero_keys`` (see train/grow.py).

FLOPs: training only, ``jaxtok.train.flops.model_flops_per_token`` x tokens (forward + backward, the
configs' count); evaluation FLOPs are excluded. The last line is the ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax

from jaxtok.train import configs, grow, pretrain
from jaxtok.train.flops import model_flops_per_token
from jaxtok.train.observe import METRICS_FILE, read_metrics, save_figure

SMALL = dict(qkv_tokens=64, proj_tokens=64, ffn_tokens=256)
LARGE = dict(qkv_tokens=128, proj_tokens=128, ffn_tokens=512)
TF_SHAPE = dict(d_model=128, n_layers=2, n_heads=4)
LLAMA_SHAPE = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=512)


def base_config(out: Path, steps: int) -> configs.ExperimentConfig:
    """Shared data, tokenizer and optimizer settings of every run."""
    items = ["tokenizer_vocab=1024", "tokenizer_documents=1000", "data.max_documents=3000", "data.seq_len=128",
             "data.global_batch=16", f"data.cache_dir={out / 'packed'}", "optimizer.lr=3e-3",
             "optimizer.warmup_steps=20", f"steps={steps}", f"eval_every={max(steps // 10, 1)}",
             "eval_batches=8", f"checkpoint_every={steps}", "keep=1", "progress=false"]
    return configs.apply_overrides(configs.get_config("tokenformer-tiny"), items)


def variant(base: configs.ExperimentConfig, out: Path, name: str, model: str, overrides: dict,
            steps: int) -> configs.ExperimentConfig:
    items = [f"model={model}", *(f"model.{k}={v}" for k, v in overrides.items()), f"steps={steps}",
             f"checkpoint_every={steps}"]
    return dataclasses.replace(configs.apply_overrides(base, items), name=name, run_dir=str(out / name))


def train(config: configs.ExperimentConfig, tokenizer: Path | None) -> Path:
    """Trains ``config`` (reusing ``tokenizer``: every run sees the same token ids)."""
    run_dir = Path(config.run_dir)
    if tokenizer is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, run_dir / pretrain.TOKENIZER_FILE)
    pretrain.run(config, devices=jax.devices()[:1])
    return run_dir


def model_config(config: configs.ExperimentConfig, run_dir: Path):
    tokenizer = pretrain.prepare_tokenizer(config, run_dir)
    return pretrain.build_task(config, tokenizer)[2]


def curve(run_dir: Path, flops_per_step: float, offset: float = 0.0) -> list[tuple[float, float, int]]:
    """``(cumulative training FLOPs, eval bpb, step)`` of every evaluation of a run."""
    evals = [r for r in read_metrics(run_dir / METRICS_FILE) if r["split"] == "eval"]
    return [(offset + flops_per_step * r["step"], r["bpb"], r["step"]) for r in evals]


def until_target(points, target: float):
    """The first point at or below ``target`` bpb (the run would stop there), else the last."""
    return next((p for p in points if p[1] <= target), points[-1])


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, names, title in ((axes[0], ("llama", "tokenformer"), "(a) equal params, equal tokens"),
                             (axes[1], ("tokenformer", "small", "grown-zero", "grown-zero_keys"),
                              "(b) growth vs scratch")):
        for name in names:
            xs, ys = [p[0] for p in curves[name]], [p[1] for p in curves[name]]
            ax.plot(xs, ys, marker="o", ms=3, label="tokenformer (scratch)" if name == "tokenformer" and
                    ax is axes[1] else name)
        ax.set_xlabel("training FLOPs (3 x forward, evals excluded)")
        ax.set_ylabel("eval bits per byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run_benchmark(out: Path, steps: int, plot_path: Path) -> dict:
    base = base_config(out, steps)
    seq, tokens_per_step = base.data.seq_len, base.data.seq_len * base.data.global_batch
    tf_cfg = variant(base, out, "tokenformer", "tokenformer-tiny", {**TF_SHAPE, **LARGE}, steps)
    tokenizer = train(tf_cfg, None) / pretrain.TOKENIZER_FILE
    llama_cfg = variant(base, out, "llama", "llama-tiny", LLAMA_SHAPE, steps)
    train(llama_cfg, tokenizer)
    small_steps = steps // 2
    small_cfg = variant(base, out, "small", "tokenformer-tiny", {**TF_SHAPE, **SMALL}, small_steps)
    train(small_cfg, tokenizer)

    large, small = model_config(tf_cfg, out / "tokenformer"), model_config(small_cfg, out / "small")
    llama = model_config(llama_cfg, out / "llama")
    # one count for both families (jaxtok.train.flops: training = 3 x forward)
    per_step = {name: model_flops_per_token(cfg, seq) * tokens_per_step
                for name, cfg in (("large", large), ("small", small), ("llama", llama))}
    budget = per_step["large"] * steps
    small_flops = per_step["small"] * small_steps
    grown_steps = int((budget - small_flops) // per_step["large"])
    curves = {"tokenformer": curve(out / "tokenformer", per_step["large"]),
              "llama": curve(out / "llama", per_step["llama"]),
              "small": curve(out / "small", per_step["small"])}
    for mode in ("zero", "zero_keys"):
        items = [f"model.{k}={v}" for k, v in LARGE.items()] + [
            f"steps={grown_steps}", f"checkpoint_every={grown_steps}", f"eval_every={max(grown_steps // 8, 1)}"]
        result = grow.grow(out / "small", out / f"grown-{mode}", items, mode=mode, devices=jax.devices()[:1])
        pretrain.run(result.config, resume=True, devices=jax.devices()[:1])
        curves[f"grown-{mode}"] = curve(out / f"grown-{mode}", per_step["large"], small_flops)
    plot(curves, plot_path)
    return dict(curves=curves, budget=budget, small_flops=small_flops, grown_steps=grown_steps,
                params={"tokenformer": large.num_params(), "small": small.num_params(),
                        "llama": llama.num_params()}, per_step=per_step)


def report(result: dict, wall_s: float) -> str:
    curves, budget = result["curves"], result["budget"]
    scratch = curves["tokenformer"][-1][1]
    print(f"params: {result['params']}")
    print(f"budget {budget:.3e} FLOPs; small stage {result['small_flops']:.3e}; grown stage <= "
          f"{result['grown_steps']} steps")
    print("| run | params | eval steps | final eval bpb | training FLOPs |")
    print("|---|---|---|---|---|")
    for name, points in curves.items():
        params = result["params"].get(name, result["params"]["tokenformer"])
        print(f"| {name} | {params:,} | {points[-1][2]} | {points[-1][1]:.4f} | {points[-1][0]:.3e} |")
    grown = {mode: until_target(curves[f"grown-{mode}"], scratch) for mode in ("zero", "zero_keys")}
    for mode, point in grown.items():
        print(f"grown-{mode}: stops at step {point[2]}: bpb {point[1]:.4f} after {point[0]:.3e} FLOPs "
              f"({point[0] / budget:.3f} of the scratch budget)")
    print(f"wall time {wall_s:.0f}s")
    print("CURVES " + json.dumps(curves))
    print(f"EXTRA grown_zero_keys_bpb={grown['zero_keys'][1]:.4f} "
          f"flops_ratio_zero_keys={grown['zero_keys'][0] / budget:.3f}")
    return (f"RESULT grown_bpb={grown['zero'][1]:.4f} scratch_bpb={scratch:.4f} "
            f"flops_ratio={grown['zero'][0] / budget:.3f} tf_bpb={scratch:.4f} "
            f"transformer_bpb={curves['llama'][-1][1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="steps of the large / Llama runs")
    parser.add_argument("--out", default="runs/bench-growth", help="run directories (replaced)")
    parser.add_argument("--plot", default="docs/tokenformer_growth.png")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    shutil.rmtree(out, ignore_errors=True)  # every run starts from step 0
    pretrain.enable_compilation_cache()
    start = time.perf_counter()
    result = run_benchmark(out, args.steps, Path(args.plot))
    print(report(result, time.perf_counter() - start))


if __name__ == "__main__":
    main()

"""TokenUnify ablation on held-out synthetic EM volumes: does pretraining help neuron segmentation?

    .venv/bin/python benchmarks/tokenunify.py                 # full size (23 min on a quiet 2-core AMD EPYC)
    .venv/bin/python benchmarks/tokenunify.py --quick         # end-to-end check (~3 min)

Same backbone (``tokenunify-small``: a 4-layer d=96 bidirectional/causal Mamba-2 over 16x64x64
crops in 4x8x8 patches), same pretraining budget for every pretrained variant, same affinity
fine-tuning budget and seed for all four:

* ``scratch``: no pretraining;
* ``mae``: random-token (masked) prediction alone, weights (1, 0, 0);
* ``ntp``: next-token prediction alone, weights (0, 1, 0);
* ``tokenunify``: the mixture, weights (1, 1, 1) summed every step.

Pretraining uses unlabelled synthetic volumes (``data.seed`` stream), fine-tuning ``--label-volumes``
labelled ones (other seeds: labels are scarce, where pretraining should matter) and the test
volumes are others again. Segmentation: predicted affinities -> seeded watershed
(``jaxtok.neuroseg.segment``), its seed threshold tuned per variant on one more labelled
validation volume (``neuroseg.tune_seed_threshold``: at one fixed threshold, 0.7, every variant
merged almost everything at this size, VOI ~6 bits, as each model's probabilities sit elsewhere);
metrics VOI (split + merge, bits) and ARAND, averaged over the
test volumes (lower is better). Writes ``results.json`` and ``tokenunify.png`` (bars + one test
slice per variant) to ``--out``; the last line is the ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jaxtok import neuroseg
from jaxtok.data import volumes
from jaxtok.train import configs, pretrain
from jaxtok.train.flops import cpu_model
from jaxtok.train.observe import save_figure

VARIANTS = {"scratch": None, "mae": (1, 0, 0), "ntp": (0, 1, 0), "tokenunify": (1, 1, 1)}
SIZES = {
    # preset, pretraining steps, fine-tuning steps, label/test volume shape, label volumes, test volumes
    "full": dict(preset="tokenunify-small", pretrain_steps=400, finetune_steps=300, volume=(32, 128, 128),
                 label_volumes=1, test_volumes=3, overrides=[]),
    "quick": dict(preset="tokenunify-tiny", pretrain_steps=30, finetune_steps=30, volume=(16, 64, 64),
                  label_volumes=1, test_volumes=1, overrides=["data.synthetic_volumes=2"]),
}




def pretrain_backbone(size: dict, weights, out: Path, steps: int):
    """``(backbone params, model config, summary)`` of a pretraining run with ``weights``."""
    items = [*size["overrides"], f"steps={steps}", f"checkpoint_every={steps}", "eval_every=0", "keep=1",
             "progress=false", f"objective.weights={','.join(str(w) for w in weights)}",
             f"optimizer.warmup_steps={max(steps // 20, 1)}"]
    config = configs.apply_overrides(configs.get_config(size["preset"]), items)
    name = "w" + "-".join(str(w) for w in weights)
    run_dir = out / f"pretrain-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = pretrain.run(dataclasses.replace(config, run_dir=str(run_dir), name=name), devices=jax.devices()[:1])
    return jax.device_get(result.state.params["backbone"]), config.model_config(vocab_size=None), config, result.summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: an end-to-end check, not a result")
    parser.add_argument("--pretrain-steps", type=int, help="override the size's pretraining steps")
    parser.add_argument("--finetune-steps", type=int, help="override the size's fine-tuning steps")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tokenunify"))
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    pre_steps = args.pretrain_steps or size["pretrain_steps"]
    fine_steps = args.finetune_steps or size["finetune_steps"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average {os.getloadavg()}, jax {jax.__version__}")
    print(f"size {'quick' if args.quick else 'full'}: {size['preset']}, pretraining {pre_steps} steps, "
          f"fine-tuning {fine_steps} steps on {size['label_volumes']} labelled {size['volume']} volume(s), "
          f"{size['test_volumes']} test volume(s)", flush=True)

    labelled = [volumes.synthetic_volume(size["volume"], seed=10_000 + i) for i in range(size["label_volumes"])]
    tests = [volumes.synthetic_volume(size["volume"], seed=20_000 + i) for i in range(size["test_volumes"])]
    validation = volumes.synthetic_volume(size["volume"], seed=30_000)  # tunes each variant's seed threshold
    results, slices = {}, {}
    for name, weights in VARIANTS.items():
        start = time.perf_counter()
        if weights is None:
            config = configs.get_config(size["preset"])
            backbone, model_config, summary = None, config.model_config(vocab_size=None), {}
        else:
            backbone, model_config, config, summary = pretrain_backbone(size, weights, args.out, pre_steps)
        pre_s = time.perf_counter() - start
        fine = neuroseg.FinetuneConfig(crop=config.data.crop, steps=fine_steps, batch=4, lr=2e-3,
                                       warmup_steps=max(fine_steps // 20, 1), seed=0)
        params, losses = neuroseg.finetune_affinities(model_config, labelled, fine, backbone)
        val_affinity = neuroseg.predict_affinities(model_config, params, validation[0], config.data.crop)
        threshold, val_voi = neuroseg.tune_seed_threshold(val_affinity, validation[1])
        scores = []
        for i, (image, labels) in enumerate(tests):
            affinity = neuroseg.predict_affinities(model_config, params, image, config.data.crop)
            seg = neuroseg.segment(affinity, seed_threshold=threshold)
            scores.append(neuroseg.evaluate_segmentation(labels, seg))
            if i == 0:
                slices[name] = seg[seg.shape[0] // 2]
        mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        results[name] = {**mean, "pretrain_s": pre_s, "finetune_s": time.perf_counter() - start - pre_s,
                         "finetune_loss_last": float(np.mean(losses[-10:])), "seed_threshold": threshold,
                         "validation_voi": val_voi,
                         "pretrain_last_loss": summary.get("last_loss")}
        print(f"{name:>10}: VOI {mean['voi']:.3f} (split {mean['voi_split']:.3f}, merge {mean['voi_merge']:.3f}) "
              f"ARAND {mean['arand']:.3f}  seed threshold {threshold} (validation VOI {val_voi[threshold]:.3f})  "
              f"fine-tune loss {results[name]['finetune_loss_last']:.4f}  "
              f"[{pre_s:.0f}s pretraining, {results[name]['finetune_s']:.0f}s fine-tuning + test]", flush=True)

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, slices, tests[0], args.out / "tokenunify.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'tokenunify.png'}")
    gain = 100 * (results["scratch"]["voi"] - results["tokenunify"]["voi"]) / max(results["scratch"]["voi"], 1e-9)
    gain_mae = 100 * (results["mae"]["voi"] - results["tokenunify"]["voi"]) / max(results["mae"]["voi"], 1e-9)
    fields = [f"{n}_voi={r['voi']:.3f}" for n, r in results.items()]
    fields += [f"{n}_arand={r['arand']:.3f}" for n, r in results.items()]
    fields += [f"tokenunify_vs_scratch_voi_gain_pct={gain:.1f}", f"tokenunify_vs_mae_voi_gain_pct={gain_mae:.1f}",
               f"pretrain_steps={pre_steps}", f"finetune_steps={fine_steps}"]
    print("RESULT " + " ".join(fields))
    return 0


def plot(results: dict, slices: dict, test: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig = plt.figure(figsize=(4 * (len(names) + 2), 4))
    ax = fig.add_subplot(1, len(names) + 2, 1)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["voi"] for n in names], 0.4, label="VOI (bits)")
    ax.bar(x + 0.2, [results[n]["arand"] for n in names], 0.4, label="ARAND")
    ax.set_xticks(x, names)
    ax.set_title("held-out volumes (lower is better)")
    ax.legend()
    image, labels = test
    z = image.shape[0] // 2
    ax = fig.add_subplot(1, len(names) + 2, 2)
    ax.imshow(image[z], cmap="gray")
    ax.contour(labels[z], levels=np.unique(labels[z]), colors="r", linewidths=0.3)
    ax.set_title("test slice, true cells")
    colours = np.random.default_rng(0).uniform(0.2, 1.0, (int(max(s.max() for s in slices.values())) + 1, 3))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names) + 2, i + 3)
        ax.imshow(colours[slices[name]])
        ax.set_title(f"{name}: VOI {results[name]['voi']:.2f}")
    for ax in fig.axes[1:]:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())

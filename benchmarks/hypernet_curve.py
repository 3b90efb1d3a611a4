"""The training curve of a ``jaxtok train-hypernet`` run, against the two lines that give it meaning.

The run evaluates bits per byte every ``eval_every`` steps on fixed held-out rows (the evaluation
files of the man-page split and the stdlib's validation split) under one fixed sampled tokenizer
the run never trains on. This script adds, on exactly the text those rows cover:

* ``first_piece``: the hypernetwork at step 0. Its residual form starts at the first piece's
  embedding, so this is the training-free "first piece" initialisation it improves on.
* ``base``: the original model with its own tokenizer (``jaxtok eval-bpb`` on each row's text,
  the whole row in one window, as the hypernetwork sees it: with its document-start token every
  byte is scored; the hypernetwork rows leave their first token unscored, so the two count
  slightly different bytes of the same text).
* ``start`` (a run started with ``--init-from``): the weights it started from, plotted at the
  steps behind them; the curve's steps count from there. Computed while that folder still holds
  them (run this script once early in such a run).

and writes the curve (``--out``, default ``RUN_DIR/curve.png``), a table, and

    RESULT steps= run_steps= hours= eval_bpb= first_piece_bpb= base_bpb= ratio_to_base= tokens_per_s= mfu=

Run while the training runs or after it (it reads metrics.jsonl and the checkpoint's config; the
two reference numbers are computed once and kept in ``RUN_DIR/references.json``):

    python benchmarks/hypernet_curve.py --run-dir runs/hypernet-smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from jaxtok.train import hypernet as hn_train
from jaxtok.train.observe import read_metrics, save_figure


def saved_experiment(run_dir: Path) -> hn_train.HypernetExperiment:
    from jaxtok.train.configs import config_from_json, saved_config_json

    return config_from_json(saved_config_json(run_dir / "checkpoints")[1], hn_train.HypernetExperiment)


def references(config: hn_train.HypernetExperiment, warm: dict | None) -> dict[str, float]:
    """Bits per byte of the first-piece start, of a warm start's weights and of the original model
    on the eval rows' text."""
    from jaxtok.evaluate import evaluate_bpb
    from jaxtok.models.registry import load_pretrained_lm, module_for
    from jaxtok.transfer.hypernet import for_base

    # the run's own dtypes, so that step 0 here is what the run's evaluation would have given
    base = load_pretrained_lm(config.model, config.model_path, dtype=config.dtype, param_dtype="float32")
    lm_config = dataclasses.replace(base.config, dtype=config.dtype)
    module = module_for(lm_config)
    tables = hn_train.base_tables(lm_config, base.params)
    hcfg = for_base(config.hypernet, tables)
    data = hn_train.eval_data(config, hn_train.evaluation_documents(), base.tokenizer, hcfg)
    batch, tok = data.batch(0), data.tokenizer(0)

    task = hn_train.hypernet_task(hcfg, module, None, config.aux_weight, config.seed, data.short)
    frozen = hn_train.frozen_state(lm_config, base.params)
    score = jax.jit(lambda p, b, f: task.objective(p, b, None, f)[1])

    def hypernet_bpb(params) -> float:
        metrics = score(params, batch, frozen)
        return float(metrics["nats"]) / (np.log(2) * float(metrics["bytes"]))

    first_piece = hypernet_bpb(nn.unbox(task.init_fn(jax.random.key(config.seed))))
    start = {}
    if warm:
        try:
            params, steps, source = hn_train.warm_start(warm["from"], hcfg, config.model)
            same = hn_train.weights_digest(source) == warm["sha256"] if "sha256" in warm else steps == warm["steps"]
        except (OSError, ValueError):
            same = False
        if same:
            start = {"start_bpb": hypernet_bpb(params)}
        else:
            print(f"warning: {warm['from']} no longer holds the weights this run started from: the curve "
                  "goes without its starting point", file=sys.stderr)

    def apply(p, tokens, positions):
        return module.apply({"params": p}, tokens, positions=positions).logits

    texts = [tok.decode(row[mask > 0].tolist()) for row, mask in zip(batch["tokens"], batch["segment_ids"])]
    # the whole row in one window: the context the hypernetwork's row has (a window of the base
    # tokenizer's seq_len tokens would hold less of the text and start over inside the row)
    window = max(len(base.tokenizer.encode(t)) for t in texts) + 1
    nats = nbytes = 0.0
    for text in texts:
        result = evaluate_bpb(apply, base.params, base.tokenizer, text, window=window, stride=window,
                              batch_size=1, progress=False)
        nats, nbytes = nats + result.nats, nbytes + result.bytes
    return {"first_piece_bpb": first_piece, "base_bpb": nats / (np.log(2) * nbytes),
            "eval_tokenizer_vocab": tok.get_vocab_size(), "base_window": "row", "warm": warm, **start}


def plot(evals, refs, start: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    first = [] if start and "start_bpb" not in refs else [(start, refs.get("start_bpb", refs["first_piece_bpb"]))]
    points = first + [(start + r["step"], r["bpb"]) for r in evals]
    ax.plot(*zip(*points), marker="o", ms=3, label="hypernetwork (held-out text, unseen tokenizer)")
    if start:
        ax.axvline(start, color="tab:gray", ls="--", alpha=0.6, label=f"warm start at step {start} (new optimizer)")
    ax.axhline(refs["first_piece_bpb"], color="tab:gray", ls=":", label="first-piece start (step 0)")
    ax.axhline(refs["base_bpb"], color="tab:green", ls="--", label="original model, own tokenizer")
    ax.axhline(1.10 * refs["base_bpb"], color="tab:green", ls=":", alpha=0.6, label="goal: 1.10 x original")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/hypernet-smollm2")
    parser.add_argument("--out", default=None, help="PNG of the curve (default RUN_DIR/curve.png)")
    parser.add_argument("--recompute", action="store_true", help="recompute the reference numbers")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"{run_dir}: no metrics.jsonl (not a train-hypernet run directory)", file=sys.stderr)
        return 2
    config = saved_experiment(run_dir)
    warm_file = run_dir / hn_train.WARM_START_FILE
    warm = json.loads(warm_file.read_text()) if warm_file.is_file() else None
    cached = run_dir / "references.json"
    refs = json.loads(cached.read_text()) if cached.is_file() and not args.recompute else {}
    # absent, from the version that cut rows into windows, or of another start
    if refs.get("base_window") != "row" or refs.get("warm") != warm:
        refs = references(config, warm)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(refs, indent=1))
        tmp.replace(cached)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval" and "bpb" in r]
    if not evals:
        print("no evaluation yet", file=sys.stderr)
        return 1
    hours = sum(r.get("step_s", 0.0) for r in train) / 3600
    rate = statistics.median(r["tokens_per_s"] for r in train if "tokens_per_s" in r)
    mfu = statistics.median(r["mfu"] for r in train if "mfu" in r) if any("mfu" in r for r in train) else float("nan")
    start = warm["steps"] if warm else 0
    print(f"{'step':>6} {'bpb':>7} {'/ base':>7}")
    if "start_bpb" in refs:
        print(f"{start:>6} {refs['start_bpb']:>7.4f} {refs['start_bpb'] / refs['base_bpb']:>7.3f}  (warm start)")
    for r in evals:
        print(f"{start + r['step']:>6} {r['bpb']:>7.4f} {r['bpb'] / refs['base_bpb']:>7.3f}")
    print(f"first-piece start {refs['first_piece_bpb']:.4f}, original model {refs['base_bpb']:.4f} bits/byte; "
          f"eval tokenizer {refs['eval_tokenizer_vocab']} tokens; {hours:.2f} h of steps"
          + (f" after the warm start from {warm['from']}" if warm else ""))
    out = Path(args.out) if args.out else run_dir / "curve.png"
    plot(evals, refs, start, out, f"{config.model}: hypernetwork held-out bits/byte")
    print(f"curve: {out}")
    last = evals[-1]
    print(f"RESULT steps={start + last['step']} run_steps={last['step']} hours={hours:.2f} eval_bpb={last['bpb']:.4f} "
          f"first_piece_bpb={refs['first_piece_bpb']:.4f} base_bpb={refs['base_bpb']:.4f} "
          f"ratio_to_base={last['bpb'] / refs['base_bpb']:.3f} tokens_per_s={rate:.0f} mfu={mfu:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

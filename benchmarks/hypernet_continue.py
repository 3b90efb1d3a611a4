"""ZeTT's second claim: a short continued training of the transferred model closes most of what
the zero-shot transfer leaves. SmolLM2-135M moved to a new multilingual tokenizer by the shipped
hypernetwork (``jaxtok transfer --method hypernet --out DIR``), then trained on in-domain text
through ``jaxtok pretrain`` from the exported folder, once with only the embeddings trainable
(``trainable=embeddings``) and once in full:

    python benchmarks/hypernet_continue.py                 # 2 x 40 steps of 8 x 256 tokens: ~20 min on 2 cores
    python benchmarks/hypernet_continue.py --steps 4 --quick

The new tokenizer, training text and evaluation text are those of ``benchmarks/transfer.py``'s
multilingual domain (BPE of ``--vocab`` tokens on the man pages' tokenizer split; continued
training on that split; evaluation on the evaluation split, never trained on, in windows of the
same bytes for every model as there: 512 tokens of the original tokenizer). The gap is
``bpb(transferred) - bpb(original model, own tokenizer)``; reported per mode: bits per byte
after training, the share of the gap closed, and that share per million training tokens.

    RESULT zero_shot_ratio= embeddings_ratio= full_ratio= embeddings_gap_closed= full_gap_closed=
           embeddings_closed_per_mtok= full_closed_per_mtok= tokens=
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from transfer import bpb, cpu_model, ensure_manpages, equal_bytes_window, take_bytes  # noqa: E402  (same text, metric)


def continue_training(folder: Path, text_file: Path, run_dir: Path, trainable: str, steps: int, lr: float,
                      seq_len: int, batch: int) -> Path:
    from jaxtok.data import DataConfig
    from jaxtok.train import configs, pretrain
    from jaxtok.train.trainer import OptimizerConfig

    config = dataclasses.replace(
        configs.get_config("smollm2-continue"), name=f"continue-{trainable}", model="smollm2-135m",
        pretrained=str(folder), tokenizer=str(folder / "tokenizer.json"), trainable=trainable,
        data=DataConfig(source="text", paths=(str(text_file),), split_on_blank_lines=True, max_documents=None,
                        seq_len=seq_len, global_batch=batch, bos_token="<|endoftext|>"),
        optimizer=OptimizerConfig(lr=lr, warmup_steps=max(1, steps // 10), weight_decay=0.0, end_lr_fraction=0.1),
        steps=steps, eval_every=0, checkpoint_every=steps, run_dir=str(run_dir), progress=False)
    pretrain.run(config)
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small text and vocabulary")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr-embeddings", type=float, default=1e-3)
    parser.add_argument("--lr-full", type=float, default=3e-5)
    parser.add_argument("--vocab", type=int, default=None, help="new vocabulary (default 16384; quick 2048)")
    parser.add_argument("--eval-bytes", type=int, default=None, help="evaluated bytes (default 24000)")
    parser.add_argument("--hypernet", default="", help="hypernetwork folder (default: the shipped one)")
    parser.add_argument("--out-dir", default="runs/hypernet-continue")
    args = parser.parse_args(argv)
    vocab = args.vocab or (2048 if args.quick else 16384)
    eval_bytes = args.eval_bytes or (4000 if args.quick else 24000)
    train_bytes = 400_000 if args.quick else 6_000_000

    from jaxtok.data.manpages import manpage_split
    from jaxtok.models.registry import load_pretrained_lm
    from jaxtok.transfer import export_hf_folder, train_tokenizer, transfer

    work = Path(args.out_dir)
    if work.exists() and any(work.iterdir()):
        print(f"{work} is not empty: choose another --out-dir or remove it", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    ensure_manpages()
    split = manpage_split()
    train_docs = take_bytes([t for _, t in split["tokenizer"]], train_bytes)
    eval_text = "\n\n".join(take_bytes([t for _, t in split["evaluation"]], eval_bytes))
    text_file = work / "train.txt"
    text_file.write_text("\n\n".join(train_docs), encoding="utf-8")

    base = load_pretrained_lm("smollm2-135m")
    original = bpb(base, eval_text, 512)
    tok = train_tokenizer(train_docs, "bpe", vocab, base=base.tokenizer.hf)
    options = [f"path={args.hypernet}"] if args.hypernet else []
    moved = transfer(base, tok, "hypernet", options, base_name="smollm2-135m")
    folder = export_hf_folder(moved, work / "zero-shot")
    n_bytes = len(eval_text.encode("utf-8"))
    window = equal_bytes_window(512, len(base.tokenizer.encode(eval_text)) / n_bytes,
                                len(tok.encode(eval_text, add_special_tokens=False).ids) / n_bytes)
    print(f"windows: 512 tokens for the original, {window} for the new tokenizer (the same bytes)", flush=True)
    zero_shot = bpb(moved, eval_text, window)
    gap = zero_shot - original
    print(f"original {original:.4f} bits/byte; zero-shot hypernet {zero_shot:.4f} (x{zero_shot / original:.3f})",
          flush=True)
    tokens = args.steps * args.batch * args.seq_len
    results = {}
    for mode, lr in (("embeddings", args.lr_embeddings), ("all", args.lr_full)):
        start = time.perf_counter()
        run_dir = continue_training(folder, text_file, work / f"continue-{mode}", mode, args.steps, lr,
                                    args.seq_len, args.batch)
        after = bpb(load_pretrained_lm(f"continue-{mode}", run_dir), eval_text, window)
        closed = (zero_shot - after) / gap if gap > 0 else float("nan")
        results[mode] = (after, closed, time.perf_counter() - start)
        print(f"{mode}: {after:.4f} bits/byte (x{after / original:.3f}) after {tokens} tokens, "
              f"{100 * closed:.0f}% of the gap closed, {results[mode][2]:.0f}s", flush=True)
    print("\n| model | bits/byte | ratio to original | gap closed |\n| --- | ---: | ---: | ---: |")
    print(f"| original (own tokenizer) | {original:.4f} | 1.000 | |")
    print(f"| hypernet, zero-shot | {zero_shot:.4f} | {zero_shot / original:.3f} | 0% |")
    for mode, (after, closed, _) in results.items():
        label = "embeddings only" if mode == "embeddings" else "full model"
        print(f"| + {tokens:,} tokens, {label} | {after:.4f} | {after / original:.3f} | {100 * closed:.0f}% |")
    emb, full = results["embeddings"], results["all"]
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; CPU {cpu_model()}")
    print(f"RESULT zero_shot_ratio={zero_shot / original:.4f} embeddings_ratio={emb[0] / original:.4f} "
          f"full_ratio={full[0] / original:.4f} embeddings_gap_closed={emb[1]:.3f} full_gap_closed={full[1]:.3f} "
          f"embeddings_closed_per_mtok={emb[1] / (tokens / 1e6):.3f} "
          f"full_closed_per_mtok={full[1] / (tokens / 1e6):.3f} tokens={tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

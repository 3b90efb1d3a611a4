"""Word-pooled byte LM vs a subword (BPE) Llama vs a byte-level Llama: equal parameters, equal
training bytes, equal bytes of context, the same documents; English (the embedded stdlib corpus)
and Japanese (Debian's ``manpages-ja``: ``apt-get install -y manpages-ja``).

    python benchmarks/byte_lm.py            # full size: ~1.1M-parameter models, 2 MB of training
                                            # bytes each, 2000 scored words per language (62 min
                                            # on a quiet 2-core AMD EPYC)
    python benchmarks/byte_lm.py --quick    # end-to-end check at a tiny size (a few minutes)

Per language and model: bits per byte of held-out documents (every byte once: ``eval-bpb`` with
the document-start token for the Llamas, the empty BOS word for the word-pooled LM, whose
word-end symbols are scored too; non-overlapping windows of the same bytes of context), next-word
accuracy and rare-word accuracy (:mod:`jaxtok.next_word`, one code for all three: greedy
continuation of the same context text, every word of the held-out text up to ``--eval-words``;
"rare" = seen fewer than 10 times in the training documents), training throughput (bytes/s after
compilation) and training FLOPs per byte. The Llamas' depth is chosen so that their parameter
count is the nearest to the word-pooled model's; context lengths are set from measured bytes per
token / word so that every model sees ``--context-bytes`` of text per row.
The last line is ``RESULT`` (English keys as named in the issue, then the same with ``ja_``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxtok.data import packing, sources
from jaxtok.data.manpages import manpage_split
from jaxtok.data.pipeline import train_dataset
from jaxtok.data.words import BYTE_BOS, WordTable, byte_tokenizer, expand, pack_word_documents
from jaxtok.evaluate import evaluate_bpb
from jaxtok.models import byte_lm
from jaxtok.models.llama import Llama, LlamaConfig
from jaxtok.next_word import ByteLMContinuer, NextWordResult, TokenLMContinuer, evaluate_bpb_words, next_word_accuracy
from jaxtok.segmentation import split_words
from jaxtok.sharding import make_mesh
from jaxtok.tokenization import TextTokenizer
from jaxtok.train.flops import cpu_model, model_flops_per_token
from jaxtok.train.observe import save_figure
from jaxtok.train.pretrain import model_vocab_size, train_bpe
from jaxtok.train.trainer import OptimizerConfig, Trainer, lm_task

KINDS = ("wordpool", "subword", "byte")


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int
    word_layers: int
    byte_d_model: int
    byte_layers: int  # encoder and decoder each
    max_word_bytes: int
    prefix_slots: int
    subword_vocab: int
    train_bytes: int  # per model
    context_bytes: int
    eval_bytes: int  # held-out text for bits per byte
    eval_words: int  # words scored for next-word accuracy
    global_batch: int
    lr: float


FULL = Size(d_model=128, word_layers=4, byte_d_model=64, byte_layers=1, max_word_bytes=24, prefix_slots=4,
            subword_vocab=2048, train_bytes=2_000_000, context_bytes=768, eval_bytes=100_000, eval_words=2000,
            global_batch=16, lr=2e-3)
QUICK = Size(d_model=32, word_layers=1, byte_d_model=32, byte_layers=1, max_word_bytes=16, prefix_slots=2,
             subword_vocab=384, train_bytes=60_000, context_bytes=128, eval_bytes=4_000, eval_words=48,
             global_batch=4, lr=3e-3)


def say(*args):
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def take_bytes(docs, limit: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if not doc.strip():
            continue
        out.append(doc)
        total += len(doc.encode())
        if total >= limit:
            break
    return out


def corpus(lang: str, size: Size) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of ``lang``."""
    if lang == "en":
        train = take_bytes(sources.stdlib_documents("train"), size.train_bytes)
        held = take_bytes(sources.stdlib_documents("validation"), size.eval_bytes)
    else:
        split = manpage_split((lang,))
        if not split["evaluation"]:
            raise SystemExit(f"no man pages for {lang!r}: apt-get install -y manpages-{lang}")
        train = take_bytes((t for _, t in split["tokenizer"] + split["hypernetwork"]), size.train_bytes)
        held = take_bytes((t for _, t in split["evaluation"]), size.eval_bytes)
    return train, held


def word_counts(docs, max_bytes: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for doc in docs:
        for w in split_words(doc, max_bytes):
            counts[w] = counts.get(w, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# Models


def wordpool_config(size: Size, seq_words: int) -> byte_lm.ByteLMConfig:
    heads = max(1, size.d_model // 32)
    byte_heads = max(1, size.byte_d_model // 32)
    return byte_lm.ByteLMConfig(
        max_word_bytes=size.max_word_bytes, prefix_slots=size.prefix_slots, d_model=size.d_model,
        n_layers=size.word_layers, n_heads=heads, head_dim=size.d_model // heads, d_ff=3 * size.d_model,
        byte_d_model=size.byte_d_model, encoder_layers=size.byte_layers, decoder_layers=size.byte_layers,
        byte_heads=byte_heads, byte_head_dim=size.byte_d_model // byte_heads, byte_d_ff=3 * size.byte_d_model,
        max_seq_len=seq_words)


def llama_matching(size: Size, vocab: int, target_params: int, seq_len: int) -> LlamaConfig:
    """The Llama of width ``d_model`` whose depth gives the parameter count nearest the target."""
    heads = max(1, size.d_model // 32)
    shape = dict(vocab_size=vocab, d_model=size.d_model, n_heads=heads, n_kv_heads=heads,
                 head_dim=size.d_model // heads, d_ff=3 * size.d_model, max_seq_len=8 * seq_len)
    best = min(range(1, 33), key=lambda n: abs(LlamaConfig(n_layers=n, **shape).num_params() - target_params))
    return LlamaConfig(n_layers=best, **shape)


@dataclasses.dataclass
class Entry:
    """One model on one language: how it trains, evaluates and continues text."""

    kind: str
    config: object
    task: object
    rows: dict
    expand: object
    bytes_per_unit: float
    flops_per_unit: float
    tokenizer: TextTokenizer | None = None


def build(kind: str, size: Size, train_docs: list[str], target_params: int | None) -> Entry:
    total_bytes = sum(len(d.encode()) for d in train_docs)
    if kind == "wordpool":
        table = WordTable(size.max_word_bytes)
        units = sum(len(table.encode(d)[0]) - 1 for d in train_docs)
        seq_words = max(4, round(size.context_bytes * units / total_bytes))
        cfg = wordpool_config(size, seq_words)
        rows, table = pack_word_documents(train_docs, seq_words, size.max_word_bytes, table)
        word_bytes, word_lens = table.arrays()
        return Entry(kind, cfg, byte_lm.train_task(byte_lm.ByteLM(cfg), None), rows,
                     lambda b: expand(b, word_bytes, word_lens), total_bytes / units,
                     cfg.flops_per_word(seq_words))
    if kind == "subword":
        hf = train_bpe(train_docs, size.subword_vocab)
    else:
        hf = byte_tokenizer()
    bos = hf.token_to_id(BYTE_BOS)
    tok = TextTokenizer(hf=hf, bos_id=bos, eos_id=bos, pad_id=bos, doc_start_id=bos)
    units = sum(len(e.ids) for e in hf.encode_batch(train_docs, add_special_tokens=False))
    seq_len = max(8, round(size.context_bytes * units / total_bytes))
    cfg = llama_matching(size, model_vocab_size(hf), target_params, seq_len)
    rows = packing.pack_documents(train_docs, hf, seq_len, bos_id=bos)
    return Entry(kind, cfg, lm_task(Llama(cfg)), rows, lambda b: b, total_bytes / units,
                 model_flops_per_token(cfg, seq_len), tok)


def train(entry: Entry, size: Size, seed: int = 0) -> tuple[object, dict]:
    """Trains ``entry`` on ``size.train_bytes`` bytes of its rows; returns (params, stats)."""
    row_bytes = entry.rows["num_bytes"].mean()
    steps = max(4, math.ceil(size.train_bytes / (row_bytes * size.global_batch)))
    opt = OptimizerConfig(lr=size.lr, warmup_steps=max(2, steps // 20), weight_decay=0.1)
    trainer = Trainer(entry.task, opt, make_mesh(None, jax.devices()[:1]), total_steps=steps, seed=seed)
    state = trainer.init_state(jax.random.key(seed))
    batches = iter(train_dataset(entry.rows, global_batch=size.global_batch, seed=seed, num_epochs=None))
    seen, timed_bytes, timed_units, t0, losses = 0, 0, 0, None, []
    for step in tqdm(range(steps), desc=f"train {entry.kind}", unit="step", leave=False):
        batch = entry.expand(next(batches))
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        if step == 1:  # compiled and warm: time from here
            jax.block_until_ready(state)
            t0 = time.perf_counter()
        elif step > 1:
            timed_bytes += int(batch["num_bytes"].sum())
            timed_units += int(batch["loss_mask"].sum())
        seen += int(batch["num_bytes"].sum())
        losses.append(float(metrics["loss"]) if "loss" in metrics else float("nan"))
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    params = jax.device_get(state.params)
    return params, {"steps": steps, "train_bytes": seen, "bytes_per_s": timed_bytes / wall,
                    "units_per_s": timed_units / wall, "last_loss": float(np.mean(losses[-5:]))}


def evaluate(entry: Entry, params, held: list[str], size: Size, counts: dict[str, int]) -> dict:
    nats = nbytes = 0.0
    if entry.kind == "wordpool":
        model = byte_lm.ByteLM(entry.config)
        for doc in held:
            r = evaluate_bpb_words(model, params, doc, seq_words=entry.config.max_seq_len, batch_size=4)
            nats, nbytes = nats + r.nats, nbytes + r.bytes
        continuer = ByteLMContinuer(model, params)
    else:
        model = Llama(entry.config)
        window = entry.config.max_seq_len // 8

        def apply(p, tokens, positions):
            return model.apply({"params": p}, tokens, positions=positions).logits

        for doc in held:
            r = evaluate_bpb(apply, params, entry.tokenizer, doc, window=window, stride=window, progress=False)
            nats, nbytes = nats + r.nats, nbytes + r.bytes
        subword = entry.kind == "subword"  # a BPE: contexts end inside pieces, to be healed
        continuer = TokenLMContinuer(model, params, entry.tokenizer, heal_whitespace=subword, heal_tokens=subword)
    total = NextWordResult(0, 0, {})
    left = size.eval_words
    bar = tqdm(total=size.eval_words, desc=f"next word {entry.kind}", unit="word", leave=False)
    for doc in held:
        if left <= 0:
            break
        done = bar.n
        r = next_word_accuracy(continuer, doc, context_bytes=size.context_bytes, counts=counts,
                               max_bytes=size.max_word_bytes, batch_size=16, limit=left,
                               on_batch=lambda n, _, done=done: bar.update(done + n - bar.n))
        buckets = {k: tuple(a + b for a, b in zip(total.buckets.get(k, (0, 0)), v)) for k, v in r.buckets.items()}
        buckets.update({k: v for k, v in total.buckets.items() if k not in buckets})
        total = NextWordResult(total.right + r.right, total.total + r.total, buckets)
        left -= r.total
    bar.close()
    return {"bpb": nats / (math.log(2) * nbytes), "eval_bytes": int(nbytes), "nwa": total.accuracy,
            "rare_nwa": total.rare_accuracy, "words": total.total, "buckets": dict(total.buckets)}


def run_language(lang: str, size: Size, done: dict, save) -> dict:
    """Trains and scores the three models of one language; ``done`` holds models already scored
    by an earlier (interrupted) run of the same size, which are kept, and ``save`` is called with
    the results after each model."""
    train_docs, held = corpus(lang, size)
    say(f"[{lang}] {len(train_docs)} training documents ({sum(len(d.encode()) for d in train_docs):,} bytes), "
        f"{len(held)} held out ({sum(len(d.encode()) for d in held):,} bytes)")
    counts = word_counts(train_docs, size.max_word_bytes)
    out = dict(done)
    target = out["wordpool"]["params"] if "wordpool" in out else None
    for kind in KINDS:
        if kind in out:
            say(f"[{lang}] {kind:8s} kept from the earlier run: bpb {out[kind]['bpb']:.3f}")
            continue
        entry = build(kind, size, train_docs, target)
        params_count = entry.config.num_params()
        target = target or params_count
        params, stats = train(entry, size)
        result = evaluate(entry, params, held, size, counts)
        result.update(stats, params=params_count, bytes_per_unit=entry.bytes_per_unit,
                      flops_per_byte=entry.flops_per_unit / entry.bytes_per_unit)
        out[kind] = result
        save(lang, out)
        # every model compiles its own train step, scorer and continuation shapes: drop them, or
        # the process runs out of memory maps (the first full run died in its fourth model, LLVM
        # "Cannot allocate memory" at vm.max_map_count 65530)
        jax.clear_caches()
        rare = "n/a" if result["rare_nwa"] is None else f"{result['rare_nwa']:.3f}"
        say(f"[{lang}] {kind:8s} params {params_count:,} | {stats['steps']} steps, {stats['train_bytes']:,} bytes, "
            f"{stats['bytes_per_s']:,.0f} bytes/s | {entry.bytes_per_unit:.2f} bytes/unit, "
            f"{result['flops_per_byte'] / 1e6:.2f} MFLOPs/byte | bpb {result['bpb']:.3f} | next-word "
            f"{result['nwa']:.3f} (rare {rare}, {result['words']} words)")
    return out


def plot_results(results: dict, path: Path) -> None:
    """Per language: next-word accuracy by training-corpus frequency of the word (bars per model,
    the bucket's word count under it) and bits per byte in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxtok.next_word import BUCKETS

    names = [b[0] for b in BUCKETS]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (lang, res) in zip(axes[0], results.items()):
        width = 0.8 / len(KINDS)
        for i, kind in enumerate(k for k in KINDS if k in res):
            buckets = res[kind]["buckets"]
            acc = [buckets[n][0] / buckets[n][1] if buckets.get(n, (0, 0))[1] else np.nan for n in names]
            ax.bar(np.arange(len(names)) + (i - 1) * width, acc, width,
                   label=f"{kind} (bpb {res[kind]['bpb']:.2f}, all words {res[kind]['nwa']:.3f})")
        totals = [max(res[k]["buckets"].get(n, (0, 0))[1] for k in res) for n in names]
        ax.set_xticks(np.arange(len(names)), [f"{n}\n({t} words)" for n, t in zip(names, totals)])
        ax.set_xlabel("times the word occurs in the training documents")
        ax.set_ylabel("next-word accuracy")
        ax.set_title(f"{lang}: equal parameters, training bytes and context bytes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    say(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: an end-to-end check")
    parser.add_argument("--langs", default="en,ja")
    parser.add_argument("--train-bytes", type=int, default=None)
    parser.add_argument("--eval-words", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here, after each model")
    parser.add_argument("--resume", action="store_true",
                        help="keep the models already scored in --out (same size) and run only the rest")
    parser.add_argument("--plot", type=Path, default=None,
                        help="draw next-word accuracy by word frequency to this PNG")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    size = dataclasses.replace(size, **{k: v for k, v in (("train_bytes", args.train_bytes),
                                                          ("eval_words", args.eval_words)) if v is not None})
    say(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average {os.getloadavg()}; jax {jax.__version__}")
    say(f"size: {size}")
    out = Path(args.out) if args.out else None
    results: dict = {}
    if args.resume:
        if out is None or not out.exists():
            parser.error("--resume needs an existing --out file")
        saved = json.loads(out.read_text())
        if saved.get("size") != dataclasses.asdict(size):
            parser.error(f"{out} was written at another size: {saved.get('size')}")
        results = saved["results"]
    elif out is not None and out.exists():
        parser.error(f"{out} exists: pass --resume to continue it, or choose another --out")

    def save(lang: str, res: dict) -> None:
        results[lang] = res
        if out is not None:  # atomic: an interrupted write never loses the models already scored
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(json.dumps({"size": dataclasses.asdict(size), "results": results}, indent=1, default=str))
            os.replace(tmp, out)

    for lang in args.langs.split(","):
        results[lang] = run_language(lang, size, results.get(lang, {}), save)
    say(f"load average at the end {os.getloadavg()}")
    if args.plot:
        plot_results(results, args.plot)
    parts = []
    for lang, res in results.items():
        prefix = "" if lang == "en" else f"{lang}_"
        for metric in ("bpb", "nwa", "rare_nwa"):
            for kind in KINDS:
                value = res[kind][metric]
                parts.append(f"{prefix}{kind}_{metric}=" + ("nan" if value is None else f"{value:.4f}"))
        for kind in KINDS:
            parts.append(f"{prefix}{kind}_bytes_per_s={res[kind]['bytes_per_s']:.0f}")
            parts.append(f"{prefix}{kind}_mflops_per_byte={res[kind]['flops_per_byte'] / 1e6:.3f}")
    say("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizer transfer: the five training-free methods and the shipped ZeTT hypernetwork on the
same held-out text.

    python benchmarks/transfer.py                      # SmolLM2-135M + MiniLM, ~30-40 min on 2 loaded cores
    python benchmarks/transfer.py --quick              # small text and vocabularies: a smoke run
    python benchmarks/transfer.py --methods fvt,hypernet --skip-minilm   # some rows only (no donor
                                                       # unless omp is among them)

Domains (SmolLM2-135M-Instruct, float32):
* ``multilingual``: Debian's German, Spanish and Italian man pages (``manpages-de/-es/-it``,
  installed with apt-get when missing), roff stripped to running text;
* ``code``: Python's standard library as embedded by jaxtok (``stdlib_documents``): the
  ``train`` split trains the tokenizer (and the OMP donor), the ``validation`` split is evaluated.
* ``fr`` (``--unseen-lang``): French man pages (``manpages-fr``), a language the hypernetwork's
  training text does not have: its tokenizer split trains the tokenizer, its evaluation split is
  evaluated (the same file-level split).

Fixed file-level split of the man pages, reused by "Tokenizer transfer II": a file (key
``<lang>/<path under /usr/share/man/<lang>>``) goes by ``jaxtok.data.sources.validation_bucket(key)``
(sha1): < 0.70 tokenizer training, < 0.85 hypernetwork training, else evaluation. The lists are
written to ``OUT/splits.json``.

Per domain a byte-level BPE (``--vocab``, the base's special tokens kept) is trained on the
tokenizer split, a small Llama donor is trained on it with ``jaxtok pretrain`` (for ``omp``), and
each method is timed and evaluated: bits per byte (the document-start token ``<|endoftext|>``
before the text for every model; non-overlapping windows of the same bytes of context for every
model: ``--window`` tokens of the original tokenizer, proportionally fewer of the new), its
ratio to the original model's BPB on the same text, and tokens per byte of the new and the
original tokenizer. MiniLM (all-MiniLM-L6-v2): a new
tokenizer with MiniLM's normaliser and specials on the multilingual split; cosine between the
sentence embeddings of held-out lines under the original and the transferred tokenizer.

Ends with ``RESULT <domain>_<method>_bpb_ratio=... minilm_<method>_cos=...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxtok.data.manpages import LANGS, manpage_split  # the fixed split, shared with train-hypernet
from jaxtok.train.flops import cpu_model
from jaxtok.train.observe import save_figure

METHODS = ("mean", "fvt", "focus", "omp", "tokenadapt", "hypernet")
# (label, method, options): every method at its defaults, plus OMP with few atoms (the donor here is
# a 2-layer d=128 Llama: k=64 atoms in 128 dimensions fit noise). ``hypernet``: the hypernetwork
# shipped for the base model (its row is left out for a model without one); the benchmark's
# tokenizers are BPEs trained on the tokenizer split, never seen by the hypernetwork's training.
RUNS = [*((m, m, ()) for m in METHODS), ("omp_k8", "omp", ("k=8",)),
        ("hypernet_copy", "hypernet", ("copy_overlap=true",))]  # exact-overlap rows copied, as FVT does


# ---------------------------------------------------------------------------------------------
# Text




def ensure_manpages(langs=LANGS) -> None:
    """apt-get installs manpages-<lang> (default de/es/it) unless their files are there (sudo when not root)."""
    if all(Path(f"/usr/share/doc/manpages-{lang}").exists() for lang in langs):
        return
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*prefix, "apt-get", "install", "-y", "-qq", *[f"manpages-{lang}" for lang in langs]],
                   check=True, env=env)


def take_bytes(docs: list[str], limit: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total >= limit:
            break
        out.append(doc[: limit - total])
        total += len(out[-1].encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# Models


def equal_bytes_window(window: int, base_tpb: float, new_tpb: float) -> int:
    """Tokens of the new tokenizer that hold the bytes of ``window`` tokens of the original (from
    tokens per byte of each): the same context per window for every model, where a window of as many
    tokens of a more compact tokenizer would hold more text and start over less often."""
    return max(16, round(window * new_tpb / base_tpb))


def bpb(lm, text: str, window: int) -> float:
    from jaxtok.evaluate import evaluate_bpb
    from jaxtok.models.registry import module_for

    model = module_for(lm.config)

    def apply(params, tokens, positions):
        return model.apply({"params": params}, tokens, positions=positions).logits

    return evaluate_bpb(apply, lm.params, lm.tokenizer, text, window=window, stride=window, batch_size=4,
                        progress=False).bpb


def train_donor(tokenizer_path: Path, train_docs: list[str], work: Path, steps: int,
                bos_token: str = "<|endoftext|>") -> Path:
    """A small Llama trained by ``jaxtok pretrain`` with the new tokenizer (the OMP donor)."""
    from jaxtok.train import configs, pretrain

    data_dir = work / "donor_text"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.txt").write_text("\n\n".join(train_docs), encoding="utf-8")
    run_dir = work / "donor"
    if (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir)
    config = configs.apply_overrides(configs.get_config("tiny"), [
        f"tokenizer={tokenizer_path}", f"steps={steps}", "eval_every=0", f"checkpoint_every={steps}",
        "progress=false", "data.source=text", f"data.paths={data_dir / 'train.txt'}",
        "data.split_on_blank_lines=true", "data.max_documents=none", "data.seq_len=128", "data.global_batch=16",
        "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.head_dim=32",
        "model.d_ff=384", "optimizer.lr=3e-3", "optimizer.warmup_steps=20", f"data.bos_token={bos_token}"])
    pretrain.run(dataclasses.replace(config, run_dir=str(run_dir)))
    return run_dir


def shared_embedder():
    """MiniLM token-string embedder, cached per string (the base vocabulary is embedded once)."""
    from jaxtok.transfer.methods import minilm_embedder

    embed, cache = minilm_embedder(), {}

    def run(texts):
        missing = sorted({t for t in texts if t not in cache})
        if missing:
            for text, vec in zip(missing, embed(missing)):
                cache[text] = vec
        return np.stack([cache[t] for t in texts])

    return run


def selected_runs(methods: str, base_name: str) -> list[tuple[str, str, tuple]]:
    from jaxtok.transfer.hypernet import shipped_hypernet

    wanted = set(methods.split(",")) if methods else {m for _, m, _ in RUNS}
    unknown = wanted - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; available: {', '.join(METHODS)}")
    return [r for r in RUNS if r[1] in wanted and (r[1] != "hypernet" or shipped_hypernet(base_name))]


def transfer_all(base, new_hf, texts, donor, embedder, base_name, methods=""):
    from jaxtok.transfer import transfer

    out = {}
    for label, method, options in selected_runs(methods, base_name):
        kwargs = {"texts": texts} if method == "focus" else {"donor": donor} if method == "omp" else \
            {"embedder": embedder} if method == "tokenadapt" else {}
        start = time.perf_counter()
        lm = transfer(base, new_hf, method, options, base_name=base_name, **kwargs)
        seconds = time.perf_counter() - start
        print(f"  {label}: transferred in {seconds:.1f}s", flush=True)
        out[label] = (lm, seconds)
    return out


# ---------------------------------------------------------------------------------------------
# The runs


def run_smollm2(domain: str, train_docs, eval_text, args, work, smollm2, embedder) -> list[dict]:
    from jaxtok.models.registry import load_pretrained_lm
    from jaxtok.transfer import train_tokenizer

    print(f"== {domain}: {len(train_docs)} training docs, {len(eval_text.encode())} evaluation bytes", flush=True)
    tok = train_tokenizer(train_docs, "bpe", args.vocab, base=smollm2.tokenizer.hf)
    tok_path = work / domain / "tokenizer.json"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_path))
    donor = None
    if any(m == "omp" for _, m, _ in selected_runs(args.methods, "smollm2-135m")):
        start = time.perf_counter()
        donor = load_pretrained_lm("donor", train_donor(tok_path, train_docs, work / domain, args.donor_steps))
        print(f"  donor trained in {time.perf_counter() - start:.0f}s", flush=True)
    n_bytes = len(eval_text.encode("utf-8"))
    base_bpb = bpb(smollm2, eval_text, args.window)
    base_tpb = len(smollm2.tokenizer.encode(eval_text)) / n_bytes
    rows = [{"domain": domain, "method": "original", "bpb": base_bpb, "ratio": 1.0, "tpb": base_tpb,
             "tpb_original": base_tpb, "seconds": 0.0, "window": args.window}]
    new_tpb = len(tok.encode(eval_text, add_special_tokens=False).ids) / n_bytes
    window = equal_bytes_window(args.window, base_tpb, new_tpb)
    print(f"  windows: {args.window} tokens for the original, {window} for the new tokenizer "
          f"(~{args.window / base_tpb:.0f} bytes each)", flush=True)
    for method, (lm, seconds) in transfer_all(smollm2, tok, train_docs, donor, embedder, "smollm2-135m",
                                              args.methods).items():
        value = bpb(lm, eval_text, window)
        rows.append({"domain": domain, "method": method, "bpb": value, "ratio": value / base_bpb, "tpb": new_tpb,
                     "tpb_original": base_tpb, "seconds": seconds, "window": window})
        print(f"  {method}: bpb {value:.4f} (x{value / base_bpb:.2f})", flush=True)
    return rows


def run_minilm(train_docs, eval_lines, args, work, embedder) -> dict[str, float]:
    import jax.numpy as jnp

    from jaxtok.models.bert import sentence_embedding
    from jaxtok.models.registry import load_pretrained_lm
    from jaxtok.transfer import train_tokenizer

    print(f"== minilm: {len(eval_lines)} held-out lines", flush=True)
    minilm = load_pretrained_lm("minilm-l6")
    tok = train_tokenizer(train_docs, "bpe", args.vocab, base=minilm.tokenizer.hf)
    tok_path = work / "minilm" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_path))
    donor = None
    if any(m == "omp" for _, m, _ in selected_runs(args.methods, "minilm-l6")):
        donor = load_pretrained_lm("donor", train_donor(tok_path, train_docs, work / "minilm", args.donor_steps,
                                                        bos_token="[SEP]"))

    def embed(config, params, hf, embeddings=None):
        rows = [e.ids[:128] for e in hf.encode_batch(eval_lines)]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return np.asarray(sentence_embedding(config, params, jnp.asarray(ids), jnp.asarray(mask)))

    reference = embed(minilm.config, minilm.params, minilm.tokenizer.hf)
    cos = {}
    for method, (lm, _) in transfer_all(minilm, tok, train_docs, donor, embedder, "minilm-l6", args.methods).items():
        vectors = embed(lm.config, lm.params, tok)
        cos[method] = float(np.mean(np.sum(vectors * reference, axis=1)))
        print(f"  {method}: mean cosine {cos[method]:.4f}", flush=True)
    return cos


def table(rows: list[dict]) -> str:
    lines = ["| domain | method | bits/byte | ratio to original | tokens/byte (original) | transfer s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['method']} | {r['bpb']:.4f} | {r['ratio']:.3f} | "
                     f"{r['tpb']:.4f} ({r['tpb_original']:.4f}) | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = tuple(dict.fromkeys(r["method"] for r in rows))  # original first, then the methods run
    width = 0.8 / len(labels)
    for j, method in enumerate(labels):
        values = [next(r["bpb"] for r in rows if r["domain"] == d and r["method"] == method) for d in domains]
        ax.bar(np.arange(len(domains)) + j * width, values, width, label=method)
    ax.set_xticks(np.arange(len(domains)) + width * (len(labels) - 1) / 2, domains)
    ax.set_ylabel("bits per byte (lower is better)")
    top = 1.1 * max(r["bpb"] for r in rows if r["method"] != "omp")
    ax.set_ylim(0, top)
    for j, method in enumerate(labels):  # bars cut off by the axis get their value written
        for i, d in enumerate(domains):
            value = next(r["bpb"] for r in rows if r["domain"] == d and r["method"] == method)
            if value > top:
                ax.text(i + j * width, 0.95 * top, f"{value:.1f}", ha="center", va="top", fontsize=7, rotation=90)
    ax.set_title("SmolLM2-135M with a new tokenizer, no training")
    ax.legend(fontsize=8, ncol=len(labels), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small text, vocabulary and donor")
    parser.add_argument("--out-dir", default="runs/transfer-bench")
    parser.add_argument("--vocab", type=int, default=None, help="new vocabulary size (default 16384; quick 2048)")
    parser.add_argument("--eval-bytes", type=int, default=None, help="evaluated bytes per domain (default 24000)")
    parser.add_argument("--donor-steps", type=int, default=None, help="OMP donor training steps (default 300)")
    parser.add_argument("--window", type=int, default=512,
                        help="tokens per window for the original model; a new tokenizer gets as many bytes")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--unseen-lang", default="fr",
                        help="a third domain: man pages of a language the hypernetwork never trained on "
                             "(its own tokenizer and evaluation split; '' to skip)")
    parser.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    args = parser.parse_args(argv)
    args.vocab = args.vocab or (2048 if args.quick else 16384)
    args.eval_bytes = args.eval_bytes or (4000 if args.quick else 24000)
    args.donor_steps = args.donor_steps or (20 if args.quick else 300)
    train_bytes = 400_000 if args.quick else 6_000_000

    from jaxtok.data.sources import stdlib_documents
    from jaxtok.models.registry import load_pretrained_lm

    work = Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    ensure_manpages(LANGS + ((args.unseen_lang,) if args.unseen_lang else ()))
    split = manpage_split()
    (work / "splits.json").write_text(json.dumps({k: [key for key, _ in v] for k, v in split.items()}, indent=1))
    print("man page split: " + ", ".join(f"{k} {len(v)} files" for k, v in split.items()), flush=True)
    ml_train = take_bytes([t for _, t in split["tokenizer"]], train_bytes)
    ml_eval = "\n\n".join(take_bytes([t for _, t in split["evaluation"]], args.eval_bytes))
    code_train = take_bytes(list(stdlib_documents("train")), train_bytes)
    code_eval = "\n\n".join(take_bytes(list(stdlib_documents("validation")), args.eval_bytes))

    start = time.perf_counter()
    smollm2 = load_pretrained_lm("smollm2-135m")
    embedder = shared_embedder()
    domains = [("multilingual", ml_train, ml_eval), ("code", code_train, code_eval)]
    if args.unseen_lang:
        unseen = manpage_split((args.unseen_lang,))
        if not unseen["evaluation"]:
            raise SystemExit(f"no man pages for {args.unseen_lang!r}: apt-get install -y manpages-{args.unseen_lang}")
        domains.append((args.unseen_lang, take_bytes([t for _, t in unseen["tokenizer"]], train_bytes),
                        "\n\n".join(take_bytes([t for _, t in unseen["evaluation"]], args.eval_bytes))))
    rows = []
    for domain, train_docs, eval_text in domains:
        rows += run_smollm2(domain, train_docs, eval_text, args, work, smollm2, embedder)
    cos = {}
    if not args.skip_minilm:
        lines = [ln.strip() for _, t in split["evaluation"] for ln in t.splitlines() if len(ln.strip()) > 60]
        cos = run_minilm(ml_train, lines[: 64 if args.quick else 256], args, work, embedder)
    print()
    print(table(rows))
    (work / "results.json").write_text(json.dumps({"rows": rows, "minilm_cos": cos}, indent=1))
    plot(rows, work / "transfer_bpb.png")
    print(f"\nplot: {work / 'transfer_bpb.png'}; total {time.perf_counter() - start:.0f}s; "
          f"load average {os.getloadavg()[0]:.2f} at the end; CPU {cpu_model()}")
    parts = [f"{r['domain']}_{r['method']}_bpb_ratio={r['ratio']:.4f}" for r in rows if r["method"] != "original"]
    parts += [f"{r['domain']}_{r['method']}_seconds={r['seconds']:.1f}" for r in rows if r["method"] != "original"]
    for d, _, _ in domains:
        first = next(r for r in rows if r["domain"] == d)
        parts.append(f"{d}_tokens_per_byte_new={rows[rows.index(first) + 1]['tpb']:.4f} "
                     f"{d}_tokens_per_byte_original={first['tpb']:.4f}")
    parts += [f"minilm_{m}_cos={v:.4f}" for m, v in cos.items()]
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

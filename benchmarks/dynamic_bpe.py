"""Dynamic batch-level BPE: the jitted on-device merge against the plain references, sequence
reduction, and the two applications (MiniLM sentence embeddings, SmolLM2 prefill).

    python benchmarks/dynamic_bpe.py            # 32x512 and 256x512, 140 merges; 4.5 min on 2 quiet cores
    python benchmarks/dynamic_bpe.py --quick    # 8x128 and 32x128, 40 merges, small quality runs: a smoke run

Text: held-out running text (Debian's German/Spanish/Italian man pages of the fixed evaluation
split, ``jaxtok.data.manpages``, and the validation split of the embedded standard library),
tokenized with SmolLM2's tokenizer, packed into rows of T tokens (documents never merge into
each other). Speed: per size, the jitted merge (compilation excluded, best of 3) against
``dynamic_bpe_reference`` (the plain loop) and ``dynamic_bpe_counter`` (the paper's Counter
recount), whose outputs must be identical (checked); merges/s and speedups in one run.

Quality: MiniLM (all-MiniLM-L6-v2) on held-out English man-page sentences, word boundaries,
new units embedded by FVT (or ``--hypernet``): cosine of each sentence's merged vs original
embedding, and a similarity task built from the text: pairs of neighbouring sentences of one
page (label 1) vs sentences of different pages (label 0), Spearman correlation of the cosine
with the label for both tokenizations, and between the two models' pair scores. SmolLM2
(float32): prompts of P tokens merged (pretoken boundaries), prefilled, then the next C tokens
(original tokenizer) scored through the KV cache: bits per byte of the continuation vs a plain
prefill, prefill time and length, and greedy generation after it (tokens equal to the plain
prefill's greedy tokens).

Ends with ``RESULT speedup_32x512=... speedup_256x512=... reduction_pretoken=... reduction_word=...``
(plus the quality numbers).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from jaxtok.train.flops import cpu_model

# ---------------------------------------------------------------------------------------------
# Text


def held_out_documents(max_chars: int) -> list[str]:
    """Evaluation-split man pages (de/es/it, when installed) interleaved with stdlib files."""
    from jaxtok.data.manpages import manpage_split
    from jaxtok.data.sources import stdlib_documents

    man = [text for _, text in manpage_split()["evaluation"]]
    code = list(stdlib_documents("validation"))
    docs, total = [], 0
    for i in range(max(len(man), len(code))):
        for pool in (man, code):
            if i < len(pool) and total < max_chars:
                docs.append(pool[i][:20000])
                total += len(docs[-1])
    if not docs:
        raise SystemExit("no held-out text found (man pages or the standard library)")
    return docs


def packed_rows(tok, docs, rows: int, seq_len: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, boundaries) (rows, seq_len): documents' tokens back to back; boundary ids offset
    per document, so no unit spans two documents."""
    from jaxtok.dynamic.boundaries import encode_lines

    ids, bounds, offset = [], [], 0
    need = rows * seq_len
    for doc in docs:
        d_ids, d_bnd = encode_lines(tok, [doc], 10**9, mode)
        ids += d_ids[0]
        bounds += [b + offset if b >= 0 else -1 for b in d_bnd[0]]
        offset += max(d_bnd[0], default=0) + 1
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of held-out text for {rows}x{seq_len}")
    return (np.asarray(ids[:need], np.int32).reshape(rows, seq_len),
            np.asarray(bounds[:need], np.int32).reshape(rows, seq_len))


# ---------------------------------------------------------------------------------------------
# Speed


def speed(tok, docs, rows: int, seq_len: int, merges: int, repeats: int) -> dict:
    import jax

    from jaxtok.dynamic import dynamic_bpe_counter, dynamic_bpe_reference
    from jaxtok.dynamic.merge import MergeImpl, compile_merge, result_merges, result_units

    ids, bnd = packed_rows(tok, docs, rows, seq_len, "pretoken")
    lengths = np.full(rows, seq_len, np.int32)
    out = {}
    for impl in (MergeImpl.INCREMENTAL, MergeImpl.SORT):
        start = time.perf_counter()
        run = compile_merge(rows, seq_len, max_merges=merges, impl=impl)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = jax.block_until_ready(run(ids, bnd, lengths, np.int32(2)))
            times.append(time.perf_counter() - start)
        out[impl.value] = (min(times), compile_s, result)
    seqs, bnds = ids.tolist(), bnd.tolist()
    start = time.perf_counter()
    ref = dynamic_bpe_reference(seqs, bnds, merges)
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    counter = dynamic_bpe_counter(seqs, bnds, merges)
    counter_s = time.perf_counter() - start
    for impl, (_, _, result) in out.items():
        got = (result_units(result, ids, lengths), result_merges(result))
        if got != ref:
            raise SystemExit(f"MISMATCH: the jitted merge ({impl}) differs from the reference at {rows}x{seq_len}")
    if counter != ref:
        raise SystemExit("MISMATCH: the Counter loop differs from the reference")
    n = len(ref[1])
    jit_s, compile_s, _ = out["incremental"]
    res = {"merges": n, "jit_s": jit_s, "sort_s": out["sort"][0], "ref_s": ref_s, "counter_s": counter_s,
           "compile_s": compile_s, "speedup": ref_s / jit_s, "speedup_counter": counter_s / jit_s}
    print(f"  {rows}x{seq_len}: {n} merges, identical outputs | jitted incremental {jit_s * 1e3:.1f} ms "
          f"({n / jit_s:.0f} merges/s, compile {compile_s:.1f} s) | jitted full-recount sort "
          f"{res['sort_s'] * 1e3:.1f} ms | reference {ref_s * 1e3:.0f} ms ({n / ref_s:.0f} merges/s) | Counter "
          f"{counter_s * 1e3:.0f} ms | speedup {res['speedup']:.1f}x vs reference, "
          f"{res['speedup_counter']:.1f}x vs Counter", flush=True)
    return res


def reduction(tok, docs, rows: int, seq_len: int, merges: int, mode: str) -> tuple[float, list[float]]:
    """(reduction after all merges, the curve after 0..merges merges) of one packed batch."""
    from jaxtok.dynamic.merge import merge_batch

    ids, bnd = packed_rows(tok, docs, rows, seq_len, mode)
    r = merge_batch(ids, bnd, max_merges=merges)
    joined = np.concatenate([[0], np.cumsum(np.asarray(r.merge_count))])
    curve = (joined / ids.size).tolist()
    return float(curve[int(r.num_merges)]), curve


# ---------------------------------------------------------------------------------------------
# MiniLM


def english_sentences(limit: int) -> list[tuple[int, str]]:
    """(page index, sentence) of held-out English man pages (the evaluation bucket)."""
    import gzip
    import re
    from pathlib import Path

    from jaxtok.data.manpages import SPLIT_EDGES, strip_roff
    from jaxtok.data.sources import validation_bucket

    out = []
    files = sorted(Path("/usr/share/man/man1").glob("*.gz"))
    for page, path in enumerate(files):
        if validation_bucket(f"en/{path.name}") < SPLIT_EDGES[1]:
            continue
        try:
            text = strip_roff(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 40 <= len(s) <= 200 and s[0].isupper():
                out.append((page, s))
        if len(out) >= limit:
            break
    return out[:limit]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def minilm_quality(n_sent: int, batch: int, merges: int, hypernet: str | None) -> dict:
    import jax

    from jaxtok.dynamic.apply import bert_sentence_embeddings, embedder_for, merge_and_embed, with_specials
    from jaxtok.dynamic.boundaries import encode_lines
    from jaxtok.dynamic.merge import pad_batch
    from jaxtok.models.registry import load_pretrained_lm
    from jaxtok.transfer.hypernet import embedding_stats

    lm = load_pretrained_lm("minilm-l6")
    tok = lm.tokenizer
    embedder, hn_params = embedder_for("minilm-l6", hypernet)
    base = {"input": lm.params["word_embeddings"]}
    stats = embedding_stats(base) if embedder.config is not None else None
    sents = english_sentences(n_sent)
    texts = [s for _, s in sents]
    embed = jax.jit(bert_sentence_embeddings, static_argnums=0)
    orig, merged_vecs, before, after = [], [], 0, 0
    curve_steps = sorted({0, *range(0, merges + 1, max(1, merges // 7)), merges})
    curve = np.zeros(len(curve_steps))
    for lo in range(0, len(texts) - batch + 1, batch):
        ids, bounds = encode_lines(tok.hf, texts[lo:lo + batch], 128, "word")
        seqs, bnds = with_specials(ids, bounds, tok.bos_id, tok.eos_id)
        grid, bnd, lengths = pad_batch(seqs, bnds, 130)
        plain = merge_and_embed(grid, bnd, lengths, base, stats, hn_params, min_count=10**9, embedder=embedder,
                                max_merges=merges, max_unit_tokens=embedder.max_pieces)
        merged = merge_and_embed(grid, bnd, lengths, base, stats, hn_params, embedder=embedder, max_merges=merges,
                                 max_unit_tokens=embedder.max_pieces)
        orig.append(np.asarray(embed(lm.config, lm.params, plain)))
        merged_vecs.append(np.asarray(embed(lm.config, lm.params, merged)))
        before += int(lengths.sum())
        after += int(merged.lengths.sum())
        joined = np.concatenate([[0], np.cumsum(np.asarray(merged.merge.merge_count))])
        curve += np.array([joined[min(k, int(merged.merge.num_merges))] for k in curve_steps])
    orig, merged_vecs = np.concatenate(orig), np.concatenate(merged_vecs)
    cos = float(np.mean(np.sum(orig * merged_vecs, axis=1)))
    pages = np.array([p for p, _ in sents[:len(orig)]])
    rng = np.random.default_rng(0)
    pairs, labels = [], []
    for i in range(len(orig) - 1):
        if pages[i] == pages[i + 1]:
            pairs.append((i, i + 1))
            labels.append(1)
            j = int(rng.integers(len(orig)))
            if pages[j] != pages[i]:
                pairs.append((i, j))
                labels.append(0)
    a, b = np.array(pairs).T
    sim_orig = np.sum(orig[a] * orig[b], axis=1)
    sim_merged = np.sum(merged_vecs[a] * merged_vecs[b], axis=1)
    res = {"sentences": len(orig), "cos": cos, "rho_label_orig": spearman(sim_orig, labels),
           "rho_label_merged": spearman(sim_merged, labels), "rho_models": spearman(sim_orig, sim_merged),
           "reduction": 1 - after / before, "embedder": embedder.name,
           "curve": {k: float(c / before) for k, c in zip(curve_steps, curve)}}
    print(f"  MiniLM ({embedder.name}, word boundaries, {merges} merges/batch of {batch}): {len(orig)} sentences, "
          f"length -{res['reduction']:.1%} (with [CLS]/[SEP]), cos(merged, original) {cos:.4f}; "
          f"{len(pairs)} pairs: Spearman(sim, same-page) original {res['rho_label_orig']:.3f} vs merged "
          f"{res['rho_label_merged']:.3f}, Spearman(original sims, merged sims) {res['rho_models']:.3f}", flush=True)
    print("  MiniLM reduction vs merges: " + ", ".join(f"{k}: {v:.3f}" for k, v in res["curve"].items()))
    return res


# ---------------------------------------------------------------------------------------------
# SmolLM2 prefill


def smollm2_quality(docs, batch: int, prompt_len: int, cont_len: int, merges: int, gen_steps: int,
                    hypernet: str | None) -> dict:
    import jax

    from jaxtok.dynamic.apply import (
        embedder_for,
        merge_and_embed,
        prefill_and_generate,
        prefill_and_score,
        prefill_last_logits,
        unit_vectors,
    )
    from jaxtok.dynamic.boundaries import encode_lines
    from jaxtok.models.registry import load_pretrained_lm, module_for
    from jaxtok.transfer.hypernet import embedding_stats

    lm = load_pretrained_lm("smollm2-135m")
    model = module_for(lm.config)
    tok = lm.tokenizer
    table = lm.params["embedding"]
    embedder, hn_params = embedder_for("smollm2-135m", hypernet)
    base = {"input": table}
    stats = embedding_stats(base) if embedder.config is not None else None
    prompts, bounds, conts, cont_bytes = [], [], [], 0
    for doc in docs:
        ids, bnd = encode_lines(tok.hf, [doc], prompt_len + cont_len, "pretoken")
        if len(ids[0]) == prompt_len + cont_len:
            prompts.append(ids[0][:prompt_len])
            bounds.append(bnd[0][:prompt_len])
            conts.append(ids[0][prompt_len:])
            cont_bytes += len(tok.decode(conts[-1], skip_special_tokens=False).encode("utf-8"))
        if len(prompts) == batch:
            break
    grid, bnd = np.asarray(prompts, np.int32), np.asarray(bounds, np.int32)
    lengths = np.full(len(prompts), prompt_len, np.int32)
    cont = np.asarray(conts, np.int32)
    cmask = np.ones_like(cont, bool)

    def run(min_count):
        merged = merge_and_embed(grid, bnd, lengths, base, stats, hn_params, min_count=min_count, embedder=embedder,
                                 max_merges=merges, max_unit_tokens=embedder.max_pieces)
        width = int(-(-int(merged.lengths.max()) // 16) * 16)  # the shorter prefill (multiple of 16)
        vec = unit_vectors(merged, table)[:, :width]
        mask = merged.mask[:, :width]
        nll = float(np.asarray(prefill_and_score(model, lm.params, vec, mask, cont, cmask)).sum())
        jax.block_until_ready(prefill_last_logits(model, lm.params, vec, mask))  # compile
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(prefill_last_logits(model, lm.params, vec, mask))
            times.append(time.perf_counter() - start)
        gen = np.asarray(prefill_and_generate(model, lm.params, vec, mask, steps=gen_steps))
        return {"bpb": nll / (math.log(2) * cont_bytes), "prefill_s": min(times), "width": width,
                "units": int(merged.lengths.sum()), "gen": gen}

    plain, dyn = run(10**9), run(2)
    same = float(np.mean(plain["gen"] == dyn["gen"]))
    res = {"bpb_plain": plain["bpb"], "bpb_merged": dyn["bpb"], "prefill_reduction": 1 - dyn["units"] / plain["units"],
           "prefill_speedup": plain["prefill_s"] / dyn["prefill_s"], "gen_match": same, "embedder": embedder.name}
    print(f"  SmolLM2 ({embedder.name}, pretoken boundaries, {merges} merges, {len(prompts)} prompts of {prompt_len} "
          f"tokens): prefill units -{res['prefill_reduction']:.1%} (padded width {plain['width']} -> {dyn['width']}), "
          f"prefill {plain['prefill_s'] * 1e3:.0f} -> {dyn['prefill_s'] * 1e3:.0f} ms ({res['prefill_speedup']:.2f}x); "
          f"continuation ({cont_len} tokens, {cont_bytes} bytes) BPB {plain['bpb']:.4f} plain vs {dyn['bpb']:.4f} "
          f"merged; greedy tokens after the prefill equal to plain: {same:.1%}", flush=True)
    print("  first prompt's greedy continuation, plain : " + repr(tok.decode(plain["gen"][0])))
    print("  first prompt's greedy continuation, merged: " + repr(tok.decode(dyn["gen"][0])))
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--seq-len", type=int, default=None, help="T (default 512; quick 128)")
    parser.add_argument("--batches", default=None, help="batch sizes, e.g. 32,256 (quick 8,32)")
    parser.add_argument("--merges", type=int, default=None, help="merges per batch (default 140; quick 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true", help="speed and reduction only")
    parser.add_argument("--hypernet", default=None, help="hypernetwork folder for SmolLM2 (default: shipped or FVT)")
    parser.add_argument("--minilm-hypernet", default=None, help="hypernetwork folder for MiniLM (default: FVT)")
    args = parser.parse_args(argv)
    q = args.quick
    seq_len = args.seq_len or (128 if q else 512)
    sizes = [int(x) for x in (args.batches or ("8,32" if q else "32,256")).split(",")]
    merges = args.merges if args.merges is not None else (40 if q else 140)

    import jax

    from jaxtok.dynamic.text import load_base_tokenizer

    print(f"CPU: {cpu_model()}; load average {os.getloadavg()}; jax {jax.__version__} on {jax.devices()[0].platform}")
    tok = load_base_tokenizer("smollm2-135m")
    docs = held_out_documents(max_chars=5 * max(sizes) * seq_len + 200_000)  # ~3-4 characters a token
    print(f"speed (pretoken boundaries, min_count 2, {merges} merges):")
    speeds = {b: speed(tok, docs, b, seq_len, merges, args.repeats) for b in sizes}
    red = {}
    for mode in ("pretoken", "word"):
        red[mode], curve = reduction(tok, docs, sizes[0], seq_len, merges, mode)
        steps = range(0, len(curve), max(1, (len(curve) - 1) // 7))
        print(f"  reduction at {mode} boundaries ({sizes[0]}x{seq_len}): {red[mode]:.3f}; after k merges: "
              + ", ".join(f"{k}: {curve[k]:.3f}" for k in steps), flush=True)
    fields = {f"speedup_{b}x{seq_len}": f"{s['speedup']:.1f}" for b, s in speeds.items()}
    fields.update({f"speedup_counter_{b}x{seq_len}": f"{s['speedup_counter']:.1f}" for b, s in speeds.items()})
    fields.update({f"merges_per_s_{b}x{seq_len}": f"{s['merges'] / s['jit_s']:.0f}" for b, s in speeds.items()})
    fields["reduction_pretoken"], fields["reduction_word"] = f"{red['pretoken']:.3f}", f"{red['word']:.3f}"
    if not args.skip_quality:
        print("quality:")
        m = minilm_quality(96 if q else 1024, 32, 20 if q else 40, args.minilm_hypernet)
        s = smollm2_quality(docs, 4 if q else 16, 64 if q else 256, 16 if q else 64, 20 if q else 140,
                            8 if q else 16, args.hypernet)
        fields.update({"minilm_cos": f"{m['cos']:.4f}", "minilm_rho_orig": f"{m['rho_label_orig']:.3f}",
                       "minilm_rho_merged": f"{m['rho_label_merged']:.3f}", "minilm_reduction": f"{m['reduction']:.3f}",
                       "smollm2_bpb_plain": f"{s['bpb_plain']:.4f}", "smollm2_bpb_merged": f"{s['bpb_merged']:.4f}",
                       "smollm2_prefill_reduction": f"{s['prefill_reduction']:.3f}",
                       "smollm2_prefill_speedup": f"{s['prefill_speedup']:.2f}",
                       "smollm2_gen_match": f"{s['gen_match']:.3f}",
                       "embedder": s["embedder"]})
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

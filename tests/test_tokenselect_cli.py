"""``--sparse-attention tokenselect`` in ``jaxtok eval-bpb`` and ``jaxtok generate`` (SmolLM2)."""

import re

import pytest

from jaxtok.cli import build_parser, main


def test_sparse_flags_parse_into_a_config():
    from jaxtok.cli import _sparse_config

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--sparse-attention", "tokenselect",
                                      "--select-k", "64", "--n-init", "4", "--n-local", "16", "--chunk", "32",
                                      "--select-share", "kv_head", "--dense-layers", "0,1",
                                      "--selection-cache", "0.9"])
    cfg = _sparse_config(args)
    assert (cfg.k, cfg.n_init, cfg.n_local, cfg.chunk, cfg.share, cfg.dense_layers, cfg.cache_threshold) == (
        64, 4, 16, 32, "kv_head", (0, 1), 0.9)
    args = build_parser().parse_args(["eval-bpb", "--sparse-attention", "tokenselect"])
    assert _sparse_config(args).cache_threshold is None  # no selection cache in evaluation
    assert _sparse_config(build_parser().parse_args(["eval-bpb"])) is None


@pytest.mark.slow
def test_eval_bpb_and_generate_with_tokenselect(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Sparse attention keeps a few tokens of a long context and drops the rest. " * 12)
    common = ["--sparse-attention", "tokenselect", "--select-k", "8", "--n-init", "4", "--n-local", "8"]
    # (dense eval-bpb: test_cli.py; sparse = dense when everything is selected: test_tokenselect.py)
    assert main(["eval-bpb", "--text", str(text), "--window", "128", *common, "--chunk", "16"]) == 0
    match = re.fullmatch(r"RESULT bpb=(\S+) tokens=(\d+) bytes=(\d+)", capsys.readouterr().out.strip().splitlines()[-1])
    assert match and 0.05 < float(match[1]) < 3.0 and int(match[2]) > 100
    assert main(["eval-bpb", "--text", str(text), "--window", "100", *common, "--chunk", "16"]) == 2
    assert "multiple of --chunk" in capsys.readouterr().err
    # one new token: the prompt's chunked prefill with selection, no decode loop to compile
    assert main(["generate", "--prompt", "Say hi. " * 10, "--max-new-tokens", "1", *common, "--chunk", "16"]) == 0
    assert capsys.readouterr().out.strip()

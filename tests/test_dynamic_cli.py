"""``jaxtok dynamic-bpe`` on real text: the JSON it writes equals the plain reference run on the
same encoded lines (byte-level BPE and WordPiece tokenizers, every boundary mode), its RESULT
line agrees with the JSON, the boundary rules on hand-checked sentences, and clear errors."""

import json
import re
from pathlib import Path

import pytest
from _transfer_models import base_tokenizer, wordpiece_tokenizer

from jaxtok.cli import main
from jaxtok.dynamic import dynamic_bpe_reference
from jaxtok.dynamic.boundaries import encode_lines

SAMPLE = Path(__file__).parent.parent / "jaxtok" / "assets" / "sample.txt"
RESULT = re.compile(r"RESULT tokens_before=(\d+) tokens_after=(\d+) reduction=(\S+) merges=(\d+) "
                    r"seconds=(\S+) compile_seconds=(\S+)")


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


@pytest.mark.parametrize("kind,boundary", [("bytelevel", "pretoken"), ("bytelevel", "word"),
                                           ("wordpiece", "word"), ("wordpiece", "none")])
def test_cli_equals_reference_on_real_text(tmp_path, capsys, kind, boundary):
    tok = base_tokenizer() if kind == "bytelevel" else wordpiece_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = tmp_path / "text.txt"
    sentences = SAMPLE.read_text(encoding="utf-8").replace(". ", ".\n")  # one sentence a line
    text.write_text(sentences + "\n\n   \n" + "the the the the\n", encoding="utf-8")
    out = tmp_path / "merged.json"
    batch, seq_len, merges = 4, 24, 12
    assert main(["dynamic-bpe", "--tokenizer", str(path), "--text", str(text), "--batch-size", str(batch),
                 "--seq-len", str(seq_len), "--merges", str(merges), "--boundary", boundary, "--json", str(out)]) == 0
    got = json.loads(out.read_text())["batches"]
    lines = _lines(text.read_text(encoding="utf-8"))
    ids, bounds = encode_lines(tok, lines, seq_len, boundary)
    assert len(got) == -(-len(lines) // batch) and len(got) > 2
    total_merges = 0
    for k, batch_out in enumerate(got):
        units, pairs = dynamic_bpe_reference(ids[k * batch:(k + 1) * batch], bounds[k * batch:(k + 1) * batch], merges)
        assert batch_out["units"] == [[list(u) for u in seq] for seq in units]
        assert batch_out["merges"] == [[list(a), list(b)] for a, b in pairs]
        total_merges += len(pairs)
    assert total_merges > 0
    match = RESULT.search(capsys.readouterr().out)
    before, after, _, n_merges = (int(match[i]) if i != 3 else float(match[i]) for i in range(1, 5))
    assert before == sum(len(s) for s in ids) and n_merges == total_merges
    assert after == sum(len(seq) for b in got for seq in b["units"]) < before


def test_boundary_rules():
    bl = base_tokenizer()
    line = "the dog's tail, wagging"
    enc = bl.encode(line, add_special_tokens=False)
    ids, pretoken = encode_lines(bl, [line], 64, "pretoken")
    assert pretoken[0] == [-1 if w is None else w for w in enc.word_ids]
    _, word = encode_lines(bl, [line], 64, "word")
    # whitespace words: "the" "dog's" "tail," "wagging"; every token's word from its offsets
    words = line.split()
    starts = [line.index(w) for w in words]
    for (s, e), w in zip(enc.offsets, word[0]):
        solid = s + len(line[s:e]) - len(line[s:e].lstrip())  # first non-space character
        assert w == max(i for i, st in enumerate(starts) if st <= solid)
    assert len(set(word[0])) == 4 and len(set(pretoken[0])) > 4
    _, none = encode_lines(bl, [line], 64, "none")
    assert set(none[0]) == {0}
    # WordPiece: "##" pieces share their word's pre-token; punctuation is its own pre-token
    wp = wordpiece_tokenizer()
    wids, wpre = encode_lines(wp, ["unbelievably quick, fox"], 64, "pretoken")
    _, wword = encode_lines(wp, ["unbelievably quick, fox"], 64, "word")
    toks = [wp.id_to_token(i) for i in wids[0]]
    assert toks[toks.index(","):] and wpre[0][toks.index(",")] != wpre[0][toks.index(",") - 1]
    assert wword[0][toks.index(",")] == wword[0][toks.index(",") - 1]
    assert max(wword[0]) == 2
    # cut to T tokens; a whitespace-only tail has no following word
    assert encode_lines(bl, [line], 3, "word")[1] == [word[0][:3]]
    tail = encode_lines(bl, ["dog   "], 8, "word")
    assert tail[1][0][0] == 0 and all(b in (0, -1) for b in tail[1][0])


def test_errors_are_clear(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    base_tokenizer().save(str(path))
    empty, text = tmp_path / "empty.txt", tmp_path / "t.txt"
    empty.write_text("\n  \n\t\n")
    text.write_text("some text\n")
    base = ["dynamic-bpe", "--tokenizer", str(path), "--merges", "3"]
    cases = [(["--text", str(empty), "--batch-size", "2", "--seq-len", "8"], "no non-empty lines"),
             (["--text", str(text), "--batch-size", "0", "--seq-len", "8"], "batch size must be >= 1"),
             (["--text", str(text), "--batch-size", "2", "--seq-len", "0"], "sequence length must be >= 1"),
             (["--text", str(text), "--batch-size", "2", "--seq-len", "8", "--boundary", "line"],
              "unknown boundary mode 'line'"),
             (["--text", str(tmp_path / "nope.txt"), "--batch-size", "2", "--seq-len", "8"], "nope.txt"),
             ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["dynamic-bpe", "--tokenizer", "nope-model", "--text", str(text), "--batch-size", "1",
                 "--seq-len", "4", "--merges", "1"]) == 2
    assert "neither a model name" in capsys.readouterr().err

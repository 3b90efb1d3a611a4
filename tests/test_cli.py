"""The command line: RESULT line format and clear errors."""

import re

import pytest

from jaxtok.cli import main


@pytest.mark.slow
def test_eval_bpb_prints_result_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Bits per byte compares models with different tokenizers fairly. " * 4)
    assert main(["eval-bpb", "--model", "smollm2-135m", "--text", str(text), "--window", "32"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"RESULT bpb=(\S+) tokens=(\d+) bytes=(\d+)", last)
    assert match, last
    bpb, tokens, num_bytes = float(match[1]), int(match[2]), int(match[3])
    assert num_bytes == len(text.read_bytes())
    assert 0.1 < bpb < 3.0 and tokens > 40


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval-bpb", "--model", "nope"]) == 2
    assert "unknown pretrained model 'nope'" in capsys.readouterr().err
    assert main(["eval-bpb", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err

"""The command line: RESULT line format, clear errors, run directories that never land on an
earlier run, and progress a log file can hold."""

import re
from pathlib import Path

import pytest

from jaxtok.cli import main
from jaxtok.train.pretrain import _summary_line, config_from_args, default_run_dir, numbered_runs


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


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "jaxtok pretrain" in out and "``" not in out


def test_generate_stops_at_eos_with_a_generous_cap():
    from jaxtok.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert args.max_new_tokens == 512


def _fake_run(run_dir: Path, step: int = 10) -> None:
    (run_dir / "checkpoints" / str(step)).mkdir(parents=True)


def test_a_repeated_default_run_gets_the_next_number_and_resume_takes_the_latest(tmp_path, capsys):
    base = tmp_path / "runs" / "default"
    assert default_run_dir(base, resume=False) == base  # nothing there yet
    assert default_run_dir(base, resume=True) == base
    (base / "checkpoints").mkdir(parents=True)  # a run that stopped before its first checkpoint
    assert default_run_dir(base, resume=False) == base
    _fake_run(base)
    assert default_run_dir(base, resume=False) == tmp_path / "runs" / "default-2"
    assert "runs/default-2" in capsys.readouterr().out
    _fake_run(tmp_path / "runs" / "default-2")
    _fake_run(tmp_path / "runs" / "default-7")
    (tmp_path / "runs" / "default-old" / "checkpoints" / "3").mkdir(parents=True)  # not a number: ignored
    assert numbered_runs(base) == [base, tmp_path / "runs" / "default-2", tmp_path / "runs" / "default-7"]
    assert default_run_dir(base, resume=True) == tmp_path / "runs" / "default-7"
    assert default_run_dir(base, resume=False) == tmp_path / "runs" / "default-8"


def test_config_from_args_numbers_only_implicit_run_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_run(tmp_path / "runs" / "tiny")
    assert config_from_args("tiny").run_dir == "runs/tiny-2"
    assert config_from_args("tiny", resume=True).run_dir == "runs/tiny"
    assert config_from_args("tiny", run_dir="runs/tiny").run_dir == "runs/tiny"  # refused when training starts


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    from jaxtok.train import observe
    from jaxtok.train.observe import RunObserver, read_metrics

    monkeypatch.setattr(observe, "_interactive", lambda: False)

    with RunObserver(tmp_path, total_steps=40, tokens_per_step=100, flops_per_token=6e6, peak_flops=1e12,
                     tensorboard=False) as observer:
        for step in range(1, 41):
            observer.train(step, {"loss": 5.0 - step / 100})
        observer.eval(40, {"loss": 4.5, "bpb": 2.0})
        summary = observer.summary()
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("step ") and "eval" not in line]
    assert [line.split()[1] for line in progress] == [f"{s}/40" for s in range(2, 41, 2)]
    assert "loss 4.600" in progress[-1] and "eta" in progress[-1] and "MFU" in progress[-1]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 6e6 / 1e12) for r in records if r["split"] == "train")
    assert "step 40: eval loss 4.5000, bpb 2.0000" in lines
    assert summary["last_loss_steps"] == 10 and summary["last_loss"] == pytest.approx(4.645)
    assert "(mean of the last 10 steps)" in _summary_line(summary) and "MFU" in _summary_line(summary)

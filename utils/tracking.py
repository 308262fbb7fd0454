"""Where training metrics go: metrics.jsonl always, TensorBoard events and Weights & Biases on request.

Only rank 0 writes. On resume, lines and events past the checkpoint's step are dropped (the
resumed run writes them again), so the record reads as one uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from utils.checkpoint import append_metrics, truncate_metrics

EVAL_KEYS = ("eval_loss", "eval_token_accuracy", "eval_tokens")


class Tracker:
    def __init__(self, out: Path, args: dict, step: int, main: bool = True):
        self.main, self.args, self.tb, self.run = main, args, None, None
        if not main:
            return
        self.path = Path(out) / "metrics.jsonl"
        truncate_metrics(self.path, step)
        if args["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at or after `step` left by an interrupted run.
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=step if step else None)
        if args["wandb_project"]:
            import wandb

            self.run = wandb.init(project=args["wandb_project"], name=args["wandb_run_name"] or None,
                                  config=args, dir=str(out), resume="allow")

    def watch(self, model) -> None:
        if self.run is not None and self.args["wandb_watch"] in ("gradients", "all"):
            import wandb

            wandb.watch(model, log=self.args["wandb_watch"])

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    def finish(self, out: Path | None) -> None:
        """Upload the finished folder if asked (--wandb_log_model), then close every sink."""
        if self.run is not None and self.args["wandb_log_model"] and out is not None:
            import wandb

            artifact = wandb.Artifact(name=f"model-{self.run.id}", type="model")
            for path in sorted(Path(out).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)
            print(f"finetune: uploaded {out} to Weights & Biases as {artifact.name}", file=sys.stderr)
        self.close()

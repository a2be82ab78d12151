"""Metrics sinks: a JSONL file (always), a console line every N steps, and Weights & Biases (offline by default)."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from rlft.config import Config, to_dict


class MetricsLogger:
    def __init__(self, cfg: Config, resume_step: int | None = None):
        """``resume_step``: continuing a run from the checkpoint of that step. Records logged after it (by the run
        that stopped) are dropped, so every step appears once, as the resumed run logs it."""
        resume = resume_step is not None
        self.output_dir = Path(cfg.logging.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.console_every_n_steps = cfg.logging.console_every_n_steps
        kept = self._records_until(resume_step) if resume and self.path.exists() else []
        self._file = self.path.open("w")
        self._file.writelines(kept)
        self._wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            self._wandb = _start_wandb(cfg, self.output_dir, resume)

    def _records_until(self, step: int) -> list[str]:
        return [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]

    def rewind(self, step: int) -> None:
        """The run goes back to the checkpoint of ``step`` (a learner was restarted) and redoes the steps after it:
        their records are dropped from the file, as on resume, so every step appears once, as redone. Weights &
        Biases cannot take back what it was sent: it keeps the first records of the redone steps and ignores the
        repeats (its steps only go forward)."""
        self._file.close()
        kept = self._records_until(step)
        self._file = self.path.open("w")
        self._file.writelines(kept)
        self._file.flush()

    def log(self, step: int, metrics: dict[str, float], console: bool | None = None) -> None:
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)
        if console if console is not None else step % self.console_every_n_steps == 0:
            shown = "  ".join(f"{k}={_short(v)}" for k, v in metrics.items())
            tqdm.write(f"step {step}: {shown}")

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg: Config, output_dir: Path, resume: bool):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.run_name or output_dir.name,
        dir=str(output_dir),
        mode=cfg.logging.wandb_mode,
        config=to_dict(cfg),
        resume="allow" if resume else None,
        id=_wandb_run_id(output_dir),
    )


def _wandb_run_id(output_dir: Path) -> str:
    """One wandb run per output directory, kept across resumes."""
    id_file = output_dir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Panels of ``plot_curves``: the first of each group of keys that the run logged is drawn.
CURVE_PANELS: tuple[tuple[str, ...], ...] = (
    ("eval/accuracy",),
    ("reward/mean", "train/loss"),
    ("eval/sampled_accuracy", "train/grad_norm"),
    ("train/entropy", "train/lr"),
)


def plot_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Draw a run's main curves from its ``metrics.jsonl`` into one PNG; returns the path, or None when the file
    holds none of the ``CURVE_PANELS`` keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = []
    for keys in CURVE_PANELS:
        key = next((k for k in keys if any(r.get(k) is not None for r in records)), None)
        if key is not None:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            panels.append((key, points))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, points) in zip(axes[0], panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(Path(metrics_path).parent))
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path

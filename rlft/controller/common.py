"""Helpers under the run lifecycle (``run.py``): embedded-default paths, output directory, checkpoint discovery and
pruning, the data sampler, the summary."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlft.config import Config, ConfigError, to_yaml
from rlft.metrics import plot_curves
from rlft.tiny import resolve


@dataclass
class RunResult:
    """What a finished run reports (also written to ``summary.json`` in its output directory)."""

    output_dir: Path
    final_model_dir: Path
    num_steps: int
    eval_accuracy_start: float | None
    eval_accuracy_end: float | None
    seconds: float

    def write_summary(self) -> None:
        summary = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")


def resolve_paths(cfg: Config) -> Config:
    """Replace ``tiny://`` paths (the embedded default, built on first use) with local ones."""
    model = dataclasses.replace(
        cfg.model,
        path=resolve(cfg.model.path),
        tokenizer_path=resolve(cfg.model.tokenizer_path or cfg.model.path),
    )
    data = dataclasses.replace(cfg.data, train_path=resolve(cfg.data.train_path))
    evaluation = dataclasses.replace(cfg.eval, path=resolve(cfg.eval.path) if cfg.eval.path else "")
    return dataclasses.replace(cfg, model=model, data=data, eval=evaluation)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    if keep_last:
        for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(cfg: Config) -> Path:
    """Create ``logging.output_dir`` and write the resolved config into it."""
    out_dir = Path(cfg.logging.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    return out_dir


def step_schedule(cfg: Config, num_rows: int, unit: str = "rows") -> tuple[EpochSampler, int]:
    """The sampler over ``num_rows`` training ``unit``s (``trainer.global_batch_size`` a step) and the number of
    steps of the run; data too small for one step is a config error."""
    per_step = cfg.trainer.global_batch_size
    sampler = EpochSampler(num_rows, per_step, cfg.trainer.seed, cfg.data.shuffle)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(
            f"trainer.global_batch_size: {per_step} {unit} per step but {cfg.data.train_path} gives only "
            f"{num_rows} training {unit}"
        )
    return sampler, cfg.trainer.max_steps or sampler.steps_per_epoch * cfg.trainer.num_epochs


def resume_path(cfg: Config, ckpt_root: Path) -> Path | None:
    """The checkpoint ``checkpoint.resume`` asks for: none, the latest in ``ckpt_root`` (auto), or a given one."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise ConfigError(f"checkpoint.resume: {resume} is not a checkpoint directory (no trainer_state.json)")
    return path


class EpochSampler:
    """Rows in a seeded permutation per epoch, a global batch at a time; the last partial batch is dropped.

    Its whole state is ``(epoch, index)``, saved in checkpoints, so a resumed run sees exactly the rows it would
    have seen without stopping.
    """

    def __init__(self, num_rows: int, batch_rows: int, seed: int, shuffle: bool):
        self.num_rows, self.batch_rows, self.seed, self.shuffle = num_rows, batch_rows, seed, shuffle
        self.epoch, self.index = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_rows

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def next_batch(self) -> list[int]:
        if self.index + self.batch_rows > self.num_rows:
            self.epoch, self.index = self.epoch + 1, 0
        picked = self._order()[self.index : self.index + self.batch_rows]
        self.index += self.batch_rows
        return picked.tolist()

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

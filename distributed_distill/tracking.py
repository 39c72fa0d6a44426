"""Console progress, `metrics.jsonl` and wandb, all from the main process only.

wandb goes through Accelerate's tracker (`log_with="wandb"`), which already restricts itself to
the main process; `logging.wandb.mode: disabled` does not initialise wandb at all, so it writes
nothing anywhere.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import newest_complete
from .config import Config, to_dict
from .errors import WriteError, write_failure
from .rundir import METRICS


def wandb_kwargs(cfg: Config) -> dict | None:
    """What `Accelerator(log_with=...)` and `init_trackers` need, or None when wandb is disabled."""
    wandb = cfg.logging.wandb
    if wandb.mode == "disabled":
        return None
    return {
        "mode": wandb.mode,
        "dir": str(Path(wandb.dir or cfg.output_dir).resolve()),
        "name": wandb.name or Path(cfg.output_dir).name,
        "entity": wandb.entity,
    }


class Tracker:
    def __init__(self, cfg: Config, accelerator: Accelerator, start_step: int = 0, run_id: str | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.max_steps = cfg.train.max_steps
        self.wandb = wandb_kwargs(cfg) is not None
        self.path = Path(cfg.output_dir) / METRICS
        self.bar = None
        self.run_id = run_id
        if self.wandb:
            # A resumed run continues the same wandb run (its id is kept in every checkpoint).
            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            accelerator.init_trackers(
                cfg.logging.wandb.project, config=to_dict(cfg), init_kwargs={"wandb": {**wandb_kwargs(cfg), **resume}}
            )
            if self.main:
                self.run_id = accelerator.get_tracker("wandb", unwrap=True).id
        if self.main and cfg.logging.progress:
            self.bar = tqdm(total=self.max_steps, initial=start_step, desc="distill", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.start_step = start_step

    def log(self, metrics: dict) -> None:
        """Append one record to metrics.jsonl (and wandb); `metrics` must hold `step`."""
        if not self.main:
            return
        # Non-finite values (a skipped step's loss) are written as null: metrics.jsonl stays strict JSON.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as e:  # a full disk mid-append: the torn line is dropped on resume (read_records)
            raise WriteError(
                f"{write_failure(e, self.path.parent)} while writing {self.path}; the newest complete checkpoint is "
                f"{newest_complete(self.path.parent) or 'none'}"
            ) from None
        if self.wandb:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def progress(self, step: int, loss: float, tokens_per_second: float, on_policy: bool | None = None) -> None:
        """Advance the bar to `step`; `on_policy` (runs with distill.on_policy): whose completions it trained on."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        mark = {} if on_policy is None else {"policy": "student" if on_policy else "data"}
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", **mark, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb:
            # The trackers only: Accelerator.end_training also destroys the process group, which the export after
            # this still needs (its barrier failed on every rank but the main one).
            for tracker in self.accelerator.trackers:
                tracker.finish()

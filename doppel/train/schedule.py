"""How many optimizer steps a run takes, and when it warms up and evaluates, in whole steps.

Computed here rather than left to the Trainer: transformers 4 wants an int for
`warmup_steps` (5 reads a float below 1 as a ratio), and `step_cap` and fractional
`eval_steps` need the run's length before the Trainer knows it. The count follows the
Trainer's: batches of `batch_size` (the last one short), `gradient_accumulation_steps`
batches per step, the last step of an epoch possibly short, at least one step an epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from doppel.train.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    steps: int  # optimizer steps in the whole run (early stopping may end it sooner)
    warmup_steps: int
    eval_steps: int  # evaluate (and checkpoint) every this many steps


def plan(config: TrainConfig, train_samples: int) -> Schedule:
    """The schedule of a run of `config` over `train_samples` samples."""
    batches = math.ceil(train_samples / config.batch_size)
    per_epoch = max(math.ceil(batches / config.gradient_accumulation_steps), 1)
    if config.max_steps > 0:
        steps = config.max_steps
    else:
        steps = math.ceil(config.epochs * per_epoch)
        steps = min(steps, config.step_cap or steps)
    warmup = math.ceil(config.warmup_ratio * steps)
    every = config.eval_steps
    eval_steps = int(every) if every >= 1 else max(1, round(every * steps))
    return Schedule(steps=steps, warmup_steps=warmup, eval_steps=eval_steps)

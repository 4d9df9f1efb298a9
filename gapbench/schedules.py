"""Learning-rate schedules and KL warm-up, as functions of the epoch.

The IWAE schedule (Burda et al. 2016, used by Cremer et al. 2018): stage i =
0..7 lasts 3^i epochs at learning rate lr · 10^(−i/7), 3,280 epochs in all;
after the last stage the rate stays at the last stage's value.
"""

from __future__ import annotations

IWAE_NUM_STAGES = 8


def iwae_stage(epoch: int) -> int:
    """The IWAE-schedule stage i of a 0-based ``epoch`` (stage i spans 3^i epochs)."""
    start, stage = 0, 0
    while stage < IWAE_NUM_STAGES - 1 and epoch >= start + 3**stage:
        start += 3**stage
        stage += 1
    return stage


def learning_rate(epoch: int, base_lr: float, schedule: str) -> float:
    """lr for a 0-based ``epoch``: constant, or lr · 10^(−i/7) at IWAE stage i."""
    if schedule == "constant":
        return base_lr
    if schedule == "iwae":
        return base_lr * 10.0 ** (-iwae_stage(epoch) / 7.0)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'iwae' or 'constant'")


def kl_weight(epoch: int, step_in_epoch: int, steps_per_epoch: int, warmup_epochs: int) -> float:
    """Linear KL warm-up: β rises from ~0 to 1 over ``warmup_epochs`` epochs, per step.

    β multiplies log p(z) − log q(z|x) in the ELBO; 0 warm-up epochs means β = 1.
    """
    if warmup_epochs <= 0:
        return 1.0
    progress = epoch + (step_in_epoch + 1) / steps_per_epoch
    return min(1.0, progress / warmup_epochs)

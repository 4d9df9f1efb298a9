"""Aggressive inference-network training (He, Spokoyny, Neubig & Berg-Kirkpatrick 2019, "Lagging
inference networks and posterior collapse in variational autoencoders").

While aggressive, each decoder update is preceded by encoder-only updates on fresh minibatches until
the encoder's objective stops improving; aggressive training ends once the mutual information
I_q(x; z) on the validation set stops rising, after which every step is a plain VAE step:

    aggressive: max_φ L_β(θ, φ) until it plateaus, then one step of max_θ L_β(θ, φ);
    after:      max_{θ,φ} L_β(θ, φ)

with L_β = E_q[log p(x|z)] − β KL(q(z|x) || p(z)), and
I_q(x; z) = E_x E_{q(z|x)}[log q(z|x) − log q(z)],  q(z) = (1/N) Σ_j q(z|x_j)  over N held-out points.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from gapbench.methods.base import Method, StepResult, decoder_parameters, elbo_terms, encoder_parameters

#: Elements of one [chunk, N, D] block of the mutual-information estimate (bounds its memory).
_MI_BLOCK = 1 << 22
#: The keys of VAE.encode's parameters that are per datapoint ([N, ...]); the others are shared.
_PER_POINT = ("mean", "log_var", "context")


@torch.no_grad()
def mutual_information(q, num_samples: int = 1) -> Tensor:
    """I_q(x; z) of the N datapoints of ``q`` (a Posterior with an exact log q), with x uniform over them.

    (1/N) Σ_i E_{z ~ q(z|x_i)}[log q(z|x_i) − log (1/N) Σ_j q(z|x_j)], estimated from ``num_samples`` draws
    of z per datapoint (the authors' estimator, calc_mi, with one draw; their aggregate is each
    minibatch's, here it is all N points'). An unbiased estimate of this empirical I_q, which lies in
    [0, log N].
    Draws from torch's generator. Returns a 0-dim float64 tensor.
    """
    z, log_q = q.sample_and_log_prob(num_samples)  # [S, N, D], [S, N]
    num_points, dim = z.shape[1], z.shape[2]
    flat = z.reshape(-1, dim)  # [S*N, D]: every draw, of every datapoint
    chunk = max(1, _MI_BLOCK // max(1, num_points * dim))
    log_agg = []
    for start in range(0, flat.shape[0], chunk):
        zc = flat[start : start + chunk]
        # log q(z_c | x_j) for every j: z_c as S' samples of each of the N posteriors.
        log_qj = q.log_prob(zc[:, None, :].expand(zc.shape[0], num_points, dim))  # [C, N]
        log_agg.append(torch.logsumexp(log_qj.double(), dim=1) - math.log(num_points))
    log_agg = torch.cat(log_agg).reshape(num_samples, num_points)
    return (log_q.double() - log_agg).mean()


def inner_steps_until_plateau(losses: List[float], check_every: int, max_steps: int) -> int:
    """The number of inner steps the authors' rule takes, given each step's loss sum (``losses[k]``,
    summed over its minibatch; all minibatches of one size): every ``check_every`` steps, stop when the
    mean loss of these steps exceeds that of the ``check_every`` before; at most ``max_steps``.
    (:meth:`Aggressive.inner_loop` applies the same rule as the losses come.)"""
    rule = _Plateau(check_every)
    for k, loss in enumerate(losses[:max_steps], start=1):
        if rule.stop_after(loss, 1):
            return k
    return min(len(losses), max_steps)


class _Plateau:
    """The authors' stopping rule, fed one step at a time."""

    def __init__(self, check_every: int):
        self.check_every, self.count = check_every, 0
        self.previous, self.current, self.seen = math.inf, 0.0, 0

    def stop_after(self, loss_sum: float, num_points: int) -> bool:
        self.count += 1
        self.current += loss_sum
        self.seen += num_points
        if self.count % self.check_every:
            return False
        mean = self.current / self.seen
        if mean > self.previous:
            return True
        self.previous, self.current, self.seen = mean, 0.0, 0
        return False


def _without_replacement(total: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct indices of ``range(total)``, uniformly (as the authors' np.random.choice(replace=False)),
    without a permutation of all ``total`` when n is small beside it."""
    if n * n < total:
        while True:  # a repeat has probability below 1/2, so few draws
            idx = torch.randint(total, (n,), generator=generator)
            if torch.unique(idx).numel() == n:
                return idx
    return torch.randperm(total, generator=generator)[:n]


@contextlib.contextmanager
def _frozen(params):
    """No gradient into ``params`` inside the block (still through them)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _settings(settings):
    if settings is None:
        from gapbench.recipe import AggressiveConfig

        return AggressiveConfig()
    return settings


class Aggressive(Method):
    """The inner loop's fresh minibatches come from the training data that :meth:`begin_epoch` gives it
    before each epoch; without it, each inner step reuses the step's own minibatch (with new draws of z)."""

    name = "aggressive"
    paper = ("He, Spokoyny, Neubig & Berg-Kirkpatrick 2019, Lagging Inference Networks and Posterior "
             "Collapse in Variational Autoencoders")
    objective = ("while I(x;z) on validation data rises: max_phi L_beta until it plateaus, then max_theta L_beta; "
                 "after: max_{theta,phi} L_beta")

    def __init__(self, model, train_cfg, settings=None):
        super().__init__(model, train_cfg, _settings(settings))
        self.aggressive = True
        self.best_mi = -math.inf
        self.epochs_below_best = 0
        # The inner loop's fresh minibatches: drawn from the training data with this generator,
        # seeded from torch's (so by the recipe's seed) and saved with the checkpoint.
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.data = None  # the Inputs of the epoch (begin_epoch); None: inner steps reuse the step's batch
        self.inner_step_counts: List[int] = []  # this epoch's inner steps per decoder update

    @classmethod
    def check(cls, recipe) -> Optional[str]:
        if recipe.model.encoder == "flow":
            return ("model.encoder: the estimate of I(x; z) needs an exact log q(z|x), which the auxiliary "
                    "'flow' encoder lacks; set model.encoder to ffg or realnvp")
        return None

    def build_optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        # Two Adams, as the authors' enc_optimizer and dec_optimizer.
        t = self.train_cfg
        return {"encoder": torch.optim.Adam(encoder_parameters(self.model), lr=t.lr, eps=t.adam_eps),
                "decoder": torch.optim.Adam(decoder_parameters(self.model), lr=t.lr, eps=t.adam_eps)}

    # ----------------------------------------------------------------- data
    def begin_epoch(self, epoch: int, inputs, device) -> None:
        """The training data the inner loop draws its fresh minibatches from (``inputs.train``)."""
        self.data = inputs

    def _fresh_batch(self, like: Tensor) -> Tensor:
        if self.data is None:
            return like
        from gapbench.experiment import training_batch

        x_train = self.data.train
        total = x_train.shape[0]
        n = min(like.shape[0], total)
        return training_batch(self.data, x_train[_without_replacement(total, n, self.generator)],
                              self.generator).to(like.device)

    # ----------------------------------------------------------------- steps
    def _objective(self, x: Tensor, beta: float):
        log_lik, log_ratio = elbo_terms(self.model, x, self.model.posterior(x), self.train_cfg.num_samples)
        return (log_lik + beta * log_ratio).mean(0), (log_lik + log_ratio).mean(0)

    def inner_loop(self, x: Tensor, beta: float) -> int:
        """Encoder-only updates of L_β, first on ``x`` and then on fresh minibatches, until the rule of
        :func:`inner_steps_until_plateau` stops them; returns their number. The decoder is not touched."""
        s = self.settings
        rule = _Plateau(s.check_every)
        encoder = encoder_parameters(self.model)
        batch, steps = x, 0
        with _frozen(decoder_parameters(self.model)):
            while steps < s.max_inner_steps:
                obj, _ = self._objective(batch, beta)
                self.apply(-obj.mean(), ["encoder"], encoder)
                steps += 1
                if rule.stop_after(-obj.detach().double().sum().item(), obj.shape[0]):
                    break
                if steps < s.max_inner_steps:
                    batch = self._fresh_batch(x)
        return steps

    def step(self, x, beta):
        if self.aggressive:
            self.inner_step_counts.append(self.inner_loop(x, beta))
            obj, elbo = self._objective(x, beta)
            with _frozen(encoder_parameters(self.model)):
                self.apply(-obj.mean(), ["decoder"], decoder_parameters(self.model))
        else:
            obj, elbo = self._objective(x, beta)
            self.apply(-obj.mean())
        return StepResult(obj.detach(), elbo.detach())

    # ----------------------------------------------------------------- epochs
    @torch.no_grad()
    def validation_mi(self, x: Tensor, device, batch_size: int = 500) -> float:
        """I_q(x; z) over the points of ``x`` (one draw of z each); the encoder runs in batches."""
        parts = [self.model.encode(x[i : i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)]
        # Per-datapoint parameters are concatenated; the shared flow weights ([1, ...]) are the same in every part.
        params = {k: torch.cat([p[k] for p in parts]) if k in _PER_POINT else v for k, v in parts[0].items()}
        q = self.model.family.posterior(params, num_points=x.shape[0])
        return mutual_information(q).item()

    def end_epoch(self, epoch, inputs, device):
        """While aggressive: I_q(x; z) on the validation set; aggressive training ends after
        ``mi_patience`` epochs (in all) below the best value so far. Also the epoch's mean number of
        inner steps per decoder update (0 once plain)."""
        counts, self.inner_step_counts = self.inner_step_counts, []
        inner = sum(counts) / len(counts) if counts else 0.0
        if not self.aggressive:
            return {"mutual_info": float("nan"), "aggressive": 0, "inner_steps": inner}
        mi = self.validation_mi(inputs.valid, device)
        if mi >= self.best_mi:
            self.best_mi = mi
        else:
            self.epochs_below_best += 1
            if self.epochs_below_best >= self.settings.mi_patience:
                self.aggressive = False
        return {"mutual_info": mi, "aggressive": int(self.aggressive), "inner_steps": inner}

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        return {"aggressive": self.aggressive, "best_mi": self.best_mi, "epochs_below_best": self.epochs_below_best,
                "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if not state:
            return
        self.aggressive = bool(state["aggressive"])
        self.best_mi = float(state["best_mi"])
        self.epochs_below_best = int(state["epochs_below_best"])
        self.generator.set_state(state["generator"])

"""The interface every training method implements (``train.method``), and what they share.

A method owns the optimizers of one VAE and updates it on one minibatch per
:meth:`Method.step`. It may add modules to the model when the model is built
(:meth:`Method.prepare_model`: an update network, a normalized encoder), so that
the checkpoint, the best-epoch snapshot and the evaluation carry them; and it may
offer a test-time refinement of the encoder's q (:meth:`Method.refine`), which
``evaluate-gaps`` reports as L[q_refined] beside L[q].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gapbench.errors import GapbenchError


class NonFiniteLoss(GapbenchError):
    """A step's loss was NaN or inf; nothing was updated. ``train`` turns it into TrainingDiverged."""

    def __init__(self, value: float):
        super().__init__(f"the loss is {value}")
        self.value = value


@dataclass
class StepResult:
    """Per-datapoint [N] values of one step, detached: what the step maximized, and the encoder's ELBO."""

    objective: Tensor
    elbo: Tensor


@dataclass(frozen=True)
class BatchShare:
    """This process's rows [start, start + n) of a global batch of ``total`` rows, in data-parallel training.

    ``reduce(params, loss)`` sums every process's gradients of ``params`` (in place) and their
    losses, and returns the summed loss; it is collective, so every process calls it each step.
    ``counted`` False: the process has no rows of this batch (fewer rows than processes) and steps
    on a stand-in row of another's, which draws the batch's noise and joins the sum but adds zero.
    """

    total: int
    start: int
    reduce: Callable[[List[nn.Parameter], Tensor], Tensor]
    counted: bool = True


def encoder_parameters(model) -> List[nn.Parameter]:
    """q(z|x)'s parameters: the encoder network, the shared flow weights and any the method added
    to ``model.method_modules`` under a name starting with ``encoder``."""
    params = list(model.encoder.parameters()) + list(model.flow_params.parameters())
    extra = getattr(model, "method_modules", None)
    if extra is not None:
        params += [p for name, m in extra.items() if name.startswith("encoder") for p in m.parameters()]
    return params


def decoder_parameters(model) -> List[nn.Parameter]:
    """p(x|z)'s parameters: the decoder and the likelihood's own (a learned variance, say)."""
    params = list(model.decoder.parameters())
    if isinstance(model.likelihood, nn.Module):
        params += list(model.likelihood.parameters())
    return params


def elbo_terms(model, x: Tensor, q, num_samples: int):
    """log p(x|z) [S, N] and log p(z) - log q(z) [S, N] for reparameterized z ~ q (a Posterior)."""
    z, log_q = q.sample_and_log_prob(num_samples)
    return model.log_likelihood(x, z), model.log_prior(z) - log_q


class Method:
    """One way to train a VAE. Subclasses set ``name``, ``paper`` and ``objective`` (one line of math)
    and implement :meth:`step`; the default optimizer is one Adam over every parameter.

    ``settings``: the method's own section of the recipe's train section (``train.<name>``), or None.
    """

    name: str = ""
    paper: str = ""
    objective: str = ""
    #: Whether :meth:`refine` gives a test-time refinement of the encoder's q.
    refines: bool = False
    #: What the method does to each datapoint's FFG parameters, for methods that need an FFG encoder
    #: (None: any encoder); :meth:`check` refuses other encoders with it.
    refines_ffg: Optional[str] = None
    #: Whether the method trains data-parallel under torchrun: its step takes :attr:`share` into account.
    data_parallel: bool = False
    #: This process's share of the step's global batch, set by train before each data-parallel step;
    #: None in one process.
    share: Optional[BatchShare] = None

    def __init__(self, model, train_cfg, settings=None):
        self.model, self.train_cfg, self.settings = model, train_cfg, settings
        self.optimizers: Dict[str, torch.optim.Optimizer] = self.build_optimizers()

    # ----------------------------------------------------------------- hooks
    @classmethod
    def prepare_model(cls, model, settings) -> None:
        """Add what the method needs to the freshly built model (``model.method_modules``). Default: nothing."""

    @classmethod
    def check(cls, recipe) -> Optional[str]:
        """A one-line problem with ``recipe`` that this method cannot serve (naming the key and the fix), or None."""
        if cls.refines_ffg and recipe.model.encoder != "ffg":
            return (f"model.encoder: train.method {cls.name} {cls.refines_ffg}, not a {recipe.model.encoder!r} q; "
                    "set model.encoder: ffg, or choose another train.method")
        return None

    def build_optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        t = self.train_cfg
        return {"model": torch.optim.Adam(self.model.parameters(), lr=t.lr, eps=t.adam_eps)}

    def set_lr(self, lr: float) -> None:
        """The epoch's learning rate (from ``train.lr_schedule``) for every optimizer."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self, x: Tensor, beta: float) -> StepResult:
        """Update the model on minibatch ``x``; ``beta`` is the KL warm-up weight (1 after warm-up)."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int, inputs, device) -> None:
        """Called before each epoch's first step (1-based ``epoch``), resumed runs included: a method that
        needs the data beyond the minibatch (fresh minibatches for an inner loop) keeps ``inputs``."""

    def end_epoch(self, epoch: int, inputs, device) -> Dict[str, float]:
        """Called after each epoch (1-based ``epoch``); may change the method's state. Default: nothing."""
        return {}

    def refine(self, x: Tensor):
        """The refined posterior of each datapoint of ``x`` (a Posterior [N]), for methods with ``refines``."""
        raise NotImplementedError(f"method {self.name!r} has no test-time refinement")

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        """Method state beyond the optimizers that an exact resume needs (plain tensors and numbers)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"method": self.name, "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizers" not in state:  # a checkpoint from before train.method: one Adam over the model
            self.optimizers["model"].load_state_dict(state)
            return
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.load_extra_state(state.get("extra", {}))

    # ----------------------------------------------------------------- helpers
    def batch_mean(self, values: Tensor) -> Tensor:
        """The global batch's mean of per-datapoint ``values`` [n], as this process's part of it.

        One process: values.mean(). Under :attr:`share`: values.sum() / total, whose sum over the
        processes (what :attr:`share`'s reduce forms, gradients included) is the global mean,
        however unevenly the rows are shared; a stand-in row (not ``counted``) adds zero.
        """
        if self.share is None:
            return values.mean()
        if not self.share.counted:
            return values[:0].sum()  # zero, with zero gradients for every parameter it reaches
        return values.sum() / self.share.total

    def apply(self, loss: Tensor, optimizers: Optional[Iterable[str]] = None,
              params: Optional[List[nn.Parameter]] = None) -> None:
        """Backpropagate ``loss`` and step ``optimizers`` (default: all), clipping the gradient norm of
        ``params`` (default: the model's) at ``train.max_grad_norm`` when set. A non-finite loss raises
        :class:`NonFiniteLoss` before anything changes. Under :attr:`share` the gradients and the loss
        are first summed over the processes (``loss`` is this process's part, see :meth:`batch_mean`),
        and every process raises alike when the summed loss is not finite."""
        if self.share is None and not torch.isfinite(loss):
            raise NonFiniteLoss(loss.item())
        names = list(self.optimizers) if optimizers is None else list(optimizers)
        for k in names:
            self.optimizers[k].zero_grad(set_to_none=True)
        loss.backward()
        if self.share is not None:
            total_loss = self.share.reduce(list(self.model.parameters()), loss.detach())
            if not torch.isfinite(total_loss):
                raise NonFiniteLoss(total_loss.item())
        if self.train_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters() if params is None else params,
                                           self.train_cfg.max_grad_norm)
        for k in names:
            self.optimizers[k].step()

    def apply_parts(self, parts: Sequence[Tuple[Tensor, Sequence[nn.Parameter]]]) -> None:
        """One step of every optimizer where each loss moves only its own parameters: for each
        (loss, params) pair, the gradient of that loss w.r.t. those parameters (the decoder trained on
        one bound and the encoder on another, though both depend on both networks). Every gradient is
        taken before any step; the gradient norm over all the parts' parameters is clipped at
        ``train.max_grad_norm`` when set. A non-finite loss raises :class:`NonFiniteLoss` before anything
        changes."""
        for loss, _ in parts:
            if not torch.isfinite(loss):
                raise NonFiniteLoss(loss.item())
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        clipped = []
        for loss, params in parts:
            params = [p for p in params if p.requires_grad]
            if not params:
                continue
            # The losses may share a graph (one forward pass, two bounds): keep it for the next.
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            clipped += params
        if self.train_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(clipped, self.train_cfg.max_grad_norm)
        for opt in self.optimizers.values():
            opt.step()

"""Recipes: one experiment as YAML, validated into frozen dataclasses.

A recipe names the data, the model, how to train it and how to measure its
gaps. Every key has a default, so the resolved recipe written next to a run
shows every setting that produced it; but a recipe file must name its dataset
(``data: {dataset: ...}``), so that an empty or half-written file is an error
rather than a run of every default. Unknown keys and wrong types are errors
naming the key (and the closest valid one), and the file or ``--set`` that gave
the value; nothing is silently ignored.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["train.num_epochs=5"])

``base: other.yaml`` (relative to the recipe's folder) extends another recipe:
the base is loaded first and this file's keys are merged over it, section by
section. ``base: [a.yaml, b.yaml]`` merges several, later ones over earlier.

Your own data (``data: {dataset: files, path: ...}``): a relative ``data.path``
is likewise read from the folder of the file that gives it (from the working
directory when given by ``--set``); :func:`load_recipe` makes it absolute and
fills ``data.sha256`` with the content's hash, so the resolved recipe a run
writes names exactly the data it was trained on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple

import yaml

from gapbench.errors import GapbenchError


class RecipeError(GapbenchError):
    """A recipe that cannot be used: bad YAML, unknown key, wrong type or value.

    ``key`` is the dotted key the error is about (``train.num_epochs``,
    ``evaluate.families[1]``) or None; ``problem`` the message without its
    leading ``key: ``; ``related`` the other keys a consistency check read.
    :func:`load_recipe` uses them to name where the bad value came from: a file
    or a ``--set``.
    """

    key: Optional[str] = None
    problem: Optional[str] = None
    related: Tuple[str, ...] = ()


def _key_error(key: str, problem: str, related: Tuple[str, ...] = ()) -> RecipeError:
    err = RecipeError(f"{key}: {problem}")
    err.key, err.problem, err.related = key, problem, related
    return err


def _range(lo=None, hi=None, lo_open=False):
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    # Which dataset (see `gapbench datasets`) and how to turn it into model input. "files": your own
    # images at data.path (README, "Your own data").
    dataset: Literal["digits", "mnist", "fashion-mnist", "cifar10", "omniglot", "files"] = "digits"
    # For "files": a .npz, a .npy or a folder of PNG/JPEG images. A relative path is read from the
    # folder of the recipe file that gives it (from the working directory for --set); the
    # resolved recipe holds it absolute.
    path: Optional[str] = None
    # For "files": the SHA-256 of the file's content (of a folder's images), filled in when the
    # recipe is loaded, so a run records what it was trained on; a file that no longer matches it
    # is an error. Set it to check a file; leave it out (null) to take the file as it is.
    sha256: Optional[str] = None
    data_dir: Optional[str] = None
    download: bool = False
    binarize: Literal["none", "threshold", "static", "dynamic"] = "threshold"
    split_seed: int = 0
    num_valid: Optional[int] = field(default=None, metadata=_range(lo=1))
    # For "files" holding one array (or a folder): the test split's size (null: a tenth of the images).
    num_test: Optional[int] = field(default=None, metadata=_range(lo=1))
    quantize_bits: Optional[int] = field(default=None, metadata=_range(lo=1, hi=8))
    num_train: Optional[int] = field(default=None, metadata=_range(lo=1))


@dataclass(frozen=True)
class ModelConfig:
    architecture: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = field(default=50, metadata=_range(lo=1))
    encoder_hidden: Tuple[int, ...] = (200, 200)
    decoder_hidden: Tuple[int, ...] = (200, 200)
    activation: Literal["elu", "relu", "tanh", "softplus"] = "elu"
    likelihood: Literal["bernoulli", "logistic", "categorical", "gaussian"] = "bernoulli"
    gaussian_std: Optional[float] = field(default=None, metadata=_range(lo=0, lo_open=True))
    encoder: Literal["ffg", "flow", "realnvp"] = "ffg"
    num_flow_steps: int = field(default=2, metadata=_range(lo=1))
    flow_hidden: int = field(default=100, metadata=_range(lo=1))
    conv_channels: Tuple[int, ...] = (64, 128, 256)


# ---------------------------------------------------------------- training methods' own settings
# One section per method under train (train.svi.num_steps, ...); each default is the paper's, with
# where it comes from. A method reads only its own section; the others keep their defaults.


@dataclass(frozen=True)
class SVIConfig:
    """Krishnan, Liang & Hoffman 2018: SVI steps from the encoder's output before each decoder update."""

    # Adam steps on each datapoint's (mean, log_var) per minibatch, and at test time (refine): M = 100,
    # every experiment of the authors' code (rahulk90/vae_sparse, expt/setupExperiments.py: -ns 100).
    num_steps: int = field(default=100, metadata=_range(lo=1))
    # Adam's rate for those steps: --param_lr 0.01, the code's default (optvaeutils/parse_args.py),
    # which no experiment changes (its own test-time evaluation steps at 8e-3).
    lr: float = field(default=1e-2, metadata=_range(lo=0, lo_open=True))
    # Samples of z per step: 1, one ε per datapoint and step (optvaemodels/vae.py).
    num_samples: int = field(default=1, metadata=_range(lo=1))


@dataclass(frozen=True)
class SAVAEConfig:
    """Kim, Wiseman, Miller, Sontag & Rush 2018: SGD with momentum from the encoder's output,
    backpropagated through for the encoder's update.

    Each datapoint steps on its own ELBO. The authors' code (harvardnlp/sa-vae, train_img.py) steps
    on the minibatch's mean loss at lr 1 with batches of 50, and clips the whole batch's gradient
    (of the means, and of the log-variances) at norm 5; per datapoint that is lr 1/50, and, for a
    batch of alike datapoints, a norm of 5 sqrt(50). Those are the defaults here, so the steps do
    not depend on the batch size nor on the other datapoints of the batch. The rest of the code's
    setup is the train section's: KL warm-up over 10 epochs (--warmup 10; β weights the inner
    steps' ELBO too), Adam at 1e-3 (--lr), the model's gradient clipped at norm 5 (--max_grad_norm).
    """

    # K, the inner steps: --svi_steps 20 (train_img.py, train_text.py).
    num_steps: int = field(default=20, metadata=_range(lo=1))
    # η per datapoint: --svi_lr1 = --svi_lr2 = 1 on the batch-mean loss, --batch_size 50 (train_img.py).
    lr: float = field(default=0.02, metadata=_range(lo=0, lo_open=True))
    # m: --momentum 0.5 (train_img.py, train_text.py).
    momentum: float = field(default=0.5, metadata=_range(lo=0, hi=1))
    # Each datapoint's inner gradient norm, of the mean and of log_var separately, at most this
    # (null: no clipping): --svi_max_grad_norm 5 on the batch of 50's mean gradient, 5 sqrt(50) = 35.36.
    max_grad_norm: Optional[float] = field(default=35.36, metadata=_range(lo=0, lo_open=True))


@dataclass(frozen=True)
class IterativeConfig:
    """Marino, Yue & Mandt 2018: a learned update of q's parameters from their ELBO gradient, T times.

    The update starts from the encoder's q (the authors start from the prior; here the encoder keeps
    its own ELBO, L[q], and the update network learns to improve on it). The defaults are the
    authors' single-level MNIST setup (joelouismarino/iterative_inference,
    cfg/mnist/single_level/iterative/config.py). Their learning rate (2e-4) and samples per ELBO
    estimate (10) are the train section's keys (train.lr, train.num_samples), shared by every method.
    """

    # T, the learned updates: 'n_iterations': 5.
    num_steps: int = field(default=5, metadata=_range(lo=1))
    # Width of the update network's hidden layers: 'n_units_enc': [512].
    hidden: int = field(default=512, metadata=_range(lo=1))
    # Its hidden layers (ELU, highway connections): 'n_layers_enc': [2], 'connection_type_enc': 'highway'.
    num_layers: int = field(default=2, metadata=_range(lo=1))
    # How the ELBO's gradient is fed in: "log_sign", log(|g| + 1e-5) and sign(g) beside the mean and
    # log-variance ('encoding_form': log_gradient, sign_gradient, mean, log_variance); or "layer_norm",
    # each of the gradients, mean and log-variance normalized over its latent units (the authors'
    # later code, lib/modules/latent_levels; it discards the gradient's scale, so it needs many units).
    gradient_encoding: Literal["log_sign", "layer_norm"] = "log_sign"


@dataclass(frozen=True)
class AggressiveConfig:
    """He, Spokoyny, Neubig & Berg-Kirkpatrick 2019: encoder updates until its objective stops improving
    before each decoder update, while the mutual information I(x; z) on validation data still rises."""

    # The defaults are the authors' code (jxhe/vae-lagging-encoder, text.py and image.py).
    # At most this many encoder updates per decoder update: the inner loop runs while sub_iter < 100,
    # sub_iter counting from 1 (so at most 99 there).
    max_inner_steps: int = field(default=100, metadata=_range(lo=1))
    # Every this many inner steps, the mean loss of these steps is compared with that of the steps
    # before; the loop stops when it rose: "if sub_iter % 10 == 0", "burn_pre_loss - burn_cur_loss < 0".
    check_every: int = field(default=10, metadata=_range(lo=1))
    # Aggressive training stops after this many epochs (in all, not necessarily in a row) whose mutual
    # information I(x; z) on the validation set is below the best so far: 1 in text.py
    # ("cur_mi - pre_mi < 0" against the epoch before, the same while it rises), 5 in image.py.
    mi_patience: int = field(default=1, metadata=_range(lo=1))


@dataclass(frozen=True)
class HMCConfig:
    """Hoffman 2017: z ~ q refined by HMC targeting p(z|x) before the decoder's update."""

    # M transitions of L leapfrog steps from q's sample: a short chain started where q puts its mass
    # (Hoffman 2017); M and L are this project's choice.
    num_steps: int = field(default=10, metadata=_range(lo=1))
    num_leapfrog: int = field(default=5, metadata=_range(lo=1))
    # The starting step size; it is then adapted between minibatches toward target_acceptance
    # (x1.02 above, x0.98 below: the rule of this project's AIS, after Wu et al. 2017).
    step_size: float = field(default=0.05, metadata=_range(lo=0, lo_open=True))
    # HMC's asymptotically optimal acceptance rate, 0.651 (Beskos et al. 2013).
    target_acceptance: float = field(default=0.65, metadata=_range(lo=0, hi=1, lo_open=True))


@dataclass(frozen=True)
class AIRConfig:
    """Shu, Bui, Zhao, Kochenderfer & Ermon 2018: amortized inference regularization."""

    # "denoise": the encoder reads x + N(0, noise_std^2 I) in training (the denoising VAE the paper
    # analyses); "lipschitz": the encoder's linear layers are bounded so that the encoder is
    # L-Lipschitz (the paper bounds it through weight normalization; here by exact spectral norms).
    kind: Literal["denoise", "lipschitz"] = "denoise"
    # The corruption's std, on data in [0, 1]: the regularization's strength, a setting to tune per
    # dataset; 0.1 is a mild one (a tenth of a pixel's range). This project's choice.
    noise_std: float = field(default=0.1, metadata=_range(lo=0))
    # L, the bound on the encoder's Lipschitz constant (L2 to L2), likewise a strength to tune;
    # 1 is about the norm of a freshly initialized layer. This project's choice.
    lipschitz: float = field(default=1.0, metadata=_range(lo=0, lo_open=True))


@dataclass(frozen=True)
class BSVIConfig:
    """Shu, Bui, Whang & Ermon 2019: the SVI trajectory's proposals importance-weighted
    into a buffered bound that trains the decoder."""

    # SVI steps per minibatch (the buffer holds num_steps + 1 proposals) and their Adam rate; the
    # same inner loop as train.svi. Not the paper's values, which are unconfirmed: 10 steps
    # keep the cost near 10x a VAE's; 0.01 is train.svi's rate.
    num_steps: int = field(default=10, metadata=_range(lo=1))
    lr: float = field(default=1e-2, metadata=_range(lo=0, lo_open=True))
    # Samples of z per step, each kept in the buffer: 1, one importance weight per proposal.
    num_samples: int = field(default=1, metadata=_range(lo=1))


METHOD_NAMES = ("vae", "iwae", "svi", "savae", "iterative", "aggressive", "hmc", "air", "bsvi")


@dataclass(frozen=True)
class TrainConfig:
    # How the VAE is trained (README, "Training methods"); each method's settings are its own section below.
    method: Literal["vae", "iwae", "svi", "savae", "iterative", "aggressive", "hmc", "air", "bsvi"] = "vae"
    # The bound of the plain VAE: "iwae" here is method iwae (kept so recipes and runs of before
    # train.method still load); other methods take it as "elbo".
    objective: Literal["elbo", "iwae"] = "elbo"
    num_samples: int = field(default=1, metadata=_range(lo=1))
    batch_size: int = field(default=100, metadata=_range(lo=1))
    num_epochs: int = field(default=3280, metadata=_range(lo=1))
    lr_schedule: Literal["iwae", "constant"] = "iwae"
    lr: float = field(default=1e-3, metadata=_range(lo=0, lo_open=True))
    adam_eps: float = field(default=1e-4, metadata=_range(lo=0, lo_open=True))
    warmup_epochs: int = field(default=400, metadata=_range(lo=0))
    early_stopping_patience: Optional[int] = field(default=None, metadata=_range(lo=1))
    eval_every: int = field(default=1, metadata=_range(lo=1))
    max_grad_norm: Optional[float] = field(default=None, metadata=_range(lo=0, lo_open=True))
    checkpoint_every: int = field(default=1, metadata=_range(lo=1))
    # Epochs whose weights are kept as checkpoints/epoch_<e>.pt, for gaps over training
    # (gapbench evaluate-gaps RUN --checkpoint E); increasing, each at most num_epochs.
    keep_checkpoints: Tuple[int, ...] = field(default=(), metadata=_range(lo=1))
    svi: SVIConfig = SVIConfig()
    savae: SAVAEConfig = SAVAEConfig()
    iterative: IterativeConfig = IterativeConfig()
    aggressive: AggressiveConfig = AggressiveConfig()
    hmc: HMCConfig = HMCConfig()
    air: AIRConfig = AIRConfig()
    bsvi: BSVIConfig = BSVIConfig()


#: The local optimization of Cremer, Li & Duvenaud (2018), section 5: Adam at 1e-3 from the prior on
#: 50-sample estimates of the ELBO's reparameterization gradient; every 100 steps the loss averaged,
#: stop after 10 averages without a new best. ``evaluate.local.procedure: paper`` gives these
#: values to every key of evaluate.local that the recipe leaves unset.
PAPER_LOCAL: Dict[str, Any] = {
    "lr": 1e-3, "flow_lr": None, "num_samples": 50, "check_every": 100, "flow_check_every": None, "patience": 10,
    "init": "prior", "flow_init": "prior", "gradient": "total", "lr_decay": 1.0, "improvement_se": 0.0,
}


@dataclass(frozen=True)
class LocalConfig:
    # Where the keys below that a recipe leaves unset come from: "fast" (these defaults) or
    # "paper" (PAPER_LOCAL: the paper's procedure). Keys a recipe sets always win.
    procedure: Literal["fast", "paper"] = "fast"
    lr: float = field(default=1e-2, metadata=_range(lo=0, lo_open=True))
    # Adam's rate for flow families; null = lr.
    flow_lr: Optional[float] = field(default=None, metadata=_range(lo=0, lo_open=True))
    num_samples: int = field(default=40, metadata=_range(lo=1))
    # Every check_every steps a fit's loss is averaged (its stopping rule's window); flow families
    # use flow_check_every (null = check_every). A longer window sees slower progress through the noise.
    check_every: int = field(default=100, metadata=_range(lo=1))
    flow_check_every: Optional[int] = field(default=50, metadata=_range(lo=1))
    patience: int = field(default=5, metadata=_range(lo=1))
    max_steps: int = field(default=20000, metadata=_range(lo=1))
    num_final_samples: int = field(default=1000, metadata=_range(lo=1))
    # Size of the local flows (families flow and realnvp); null = the model's own flow settings.
    num_flow_steps: Optional[int] = field(default=None, metadata=_range(lo=1))
    flow_hidden: Optional[int] = field(default=None, metadata=_range(lo=1))
    # Where each fit starts: the prior N(0, I) (the paper), or the encoder's q. A flow can
    # also start at the fitted FFG q* (its identity flow), which saves most of its steps.
    init: Literal["prior", "encoder"] = "encoder"
    flow_init: Literal["prior", "encoder", "ffg"] = "ffg"
    # At each check without a new best, multiply that datapoint's learning rate by this (1: constant, the paper).
    lr_decay: float = field(default=0.5, metadata=_range(lo=0, lo_open=True, hi=1))
    # A check is a new best only if it beats the best by this many standard errors of its average (0: the paper).
    improvement_se: float = field(default=1.0, metadata=_range(lo=0))
    # The gradient of each step: "total" (the reparameterization gradient, the paper's) or "path"
    # (its path derivative: the zero-mean score term of log q dropped, less noise near q*).
    gradient: Literal["total", "path"] = "path"


@dataclass(frozen=True)
class AISConfig:
    enabled: bool = True
    num_steps: int = field(default=1000, metadata=_range(lo=1))
    num_chains: int = field(default=16, metadata=_range(lo=1))
    num_leapfrog: int = field(default=10, metadata=_range(lo=1))
    schedule: Literal["sigmoid", "linear"] = "sigmoid"
    # The first distribution of the path: the prior (the paper), the encoder's q, or this
    # datapoint's fitted q*_FFG (needs the local FFG fit; valid for every encoder family).
    init: Literal["prior", "encoder", "ffg"] = "prior"
    # Run each transition through torch.compile (on a GPU also as a CUDA graph), falling back
    # to eager PyTorch where that fails. Speed only: results agree up to rounding.
    compile: bool = False
    # Warn when the mean AIS estimate moves more than this (nats) over the last doubling of
    # num_steps in the convergence sweep (T/2 -> T on 20 points): AIS has not converged.
    convergence_tolerance: float = field(default=0.1, metadata=_range(lo=0, lo_open=True))


#: The diagnostics ``evaluate.diagnostics`` may ask for (README, "Diagnostics"). The first four are
#: computed by evaluate-gaps from the model on the evaluated points; per_class and generalization are
#: summaries of the gaps tables that ``report`` makes.
Diagnostic = Literal["active_units", "mutual_information", "jacobian", "iwae_curve", "per_class", "generalization"]
DIAGNOSTIC_NAMES: Tuple[str, ...] = typing.get_args(Diagnostic)
#: The diagnostics that need the model (evaluate-gaps' stage "diagnostics").
MODEL_DIAGNOSTICS = ("active_units", "mutual_information", "jacobian", "iwae_curve")


@dataclass(frozen=True)
class EvaluateConfig:
    split: Literal["train", "valid", "test"] = "test"
    num_points: int = field(default=1000, metadata=_range(lo=1))
    batch_size: int = field(default=100, metadata=_range(lo=1))
    families: Tuple[Literal["ffg", "flow", "realnvp"], ...] = ("ffg", "flow")
    elbo_samples: int = field(default=5000, metadata=_range(lo=1))
    iwae_samples: int = field(default=5000, metadata=_range(lo=1))
    local: LocalConfig = LocalConfig()
    ais: AISConfig = AISConfig()
    # Diagnostics beside the gaps (README, "Diagnostics"), any of DIAGNOSTIC_NAMES: active_units (units
    # whose E_q[z|x] varies over x by more than 0.01), mutual_information (I(x; z) and the aggregate KL),
    # jacobian (latent dimensions the decoder uses), iwae_curve (IWAE_k - L[q] at each diagnostic_ks),
    # computed on the evaluated points as one extra unit of work; per_class (gaps per class label) and
    # generalization (the amortization gap on train against held-out points), made by report.
    diagnostics: Tuple[Diagnostic, ...] = ()
    # The k of the q~_k curve (iwae_curve), after Cremer, Morris & Duvenaud (2017).
    diagnostic_ks: Tuple[int, ...] = field(default=(1, 2, 5, 10, 50, 100, 500, 1000, 5000), metadata=_range(lo=1))


@dataclass(frozen=True)
class Recipe:
    name: str = "experiment"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for torch; null = torch's default (all cores). Small models run fastest on 1.
    num_threads: Optional[int] = field(default=None, metadata=_range(lo=1))
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def to_dict(self) -> Dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- conversion


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is tuple:
        item = args[0]
        if typing.get_origin(item) is Literal:
            return "a list whose items are each one of " + ", ".join(repr(a) for a in typing.get_args(item))
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(item)
        return "a list of " + plural if plural else "a list whose items are each " + _type_name(item)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = _key_error(key, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return _build(tp, value, key + ".")
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise _key_error(key, f"expected {_type_name(tp)}, got {value!r}{_suggest(value, map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp in (int, float) and isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value)  # 1e4 in YAML
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported recipe type {tp}")  # a bug in the schema, not user input


def _check_range(value, meta, key: str):
    if value is None or not meta:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            word = "greater than" if meta.get("lo_open") else "at least"
            raise _key_error(key, f"must be {word} {lo}, got {v}")
        if hi is not None and v > hi:
            raise _key_error(key, f"must be at most {hi}, got {v}")


def _build(cls, mapping: Mapping, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            where = prefix.rstrip(".") or "the recipe's top level"
            shown = str(key) if str(key).isprintable() else repr(key)  # one line, whatever the key holds
            err = RecipeError(
                f"unknown key {prefix}{shown} in {where}{_suggest(key, fields)}; valid keys: {', '.join(fields)}"
            )
            err.key = prefix + str(key)
            raise err
        kwargs[key] = _convert(value, hints[key], prefix + str(key))
        _check_range(kwargs[key], fields[key].metadata, prefix + str(key))
    return cls(**kwargs)


def _check_consistency(recipe: Recipe) -> None:
    m, d = recipe.model, recipe.data
    if recipe.train.objective == "iwae" and recipe.train.method not in ("vae", "iwae"):
        raise _key_error(
            "train.objective",
            f"'iwae' is the bound of methods vae and iwae, not of {recipe.train.method!r}; "
            "set train.objective to elbo (or train.method to iwae)",
            ("train.method",),
        )
    if m.likelihood in ("categorical", "logistic") and d.quantize_bits is None:
        raise _key_error(
            "model.likelihood",
            f"{m.likelihood!r} needs quantized data; set data.quantize_bits (e.g. 3) or use likelihood 'bernoulli'",
            ("data.quantize_bits",),
        )
    if m.likelihood == "bernoulli" and d.binarize == "none" and d.quantize_bits is not None:
        raise _key_error(
            "model.likelihood", "'bernoulli' needs binary data; set data.binarize or another likelihood",
            ("data.binarize", "data.quantize_bits"),
        )
    if m.architecture == "conv" and d.dataset not in ("cifar10", "files"):  # files: the model checks the shape
        raise _key_error(
            "model.architecture",
            f"'conv' is built for 32x32x3 images (cifar10), not {d.dataset!r}; use 'mlp'",
            ("data.dataset",),
        )
    _check_data(d)
    kept = recipe.train.keep_checkpoints
    if list(kept) != sorted(set(kept)):
        raise _key_error("train.keep_checkpoints", f"list each epoch once, in increasing order, got {list(kept)}; "
                         f"e.g. {sorted(set(kept))}")
    if kept and kept[-1] > recipe.train.num_epochs:
        raise _key_error("train.keep_checkpoints",
                         f"epoch {kept[-1]} is beyond train.num_epochs={recipe.train.num_epochs}; "
                         "keep only epochs the run trains, or raise train.num_epochs", ("train.num_epochs",))
    if recipe.evaluate.ais.init == "encoder" and m.encoder == "flow":
        raise _key_error(
            "evaluate.ais.init",
            "'encoder' needs an exact log q, which the auxiliary 'flow' encoder does not have; "
            "use 'ffg' (the fitted q*_FFG) or 'prior'",
            ("model.encoder",),
        )
    diagnostics = recipe.evaluate.diagnostics
    if "mutual_information" in diagnostics and m.encoder == "flow":
        raise _key_error(
            "evaluate.diagnostics",
            "'mutual_information' needs an exact log q(z|x), which the auxiliary 'flow' encoder only bounds; "
            "leave it out or use an 'ffg' or 'realnvp' encoder",
            ("model.encoder",),
        )
    needs_two = [d for d in ("active_units", "mutual_information") if d in diagnostics]
    if needs_two and recipe.evaluate.num_points < 2:
        raise _key_error(
            "evaluate.diagnostics",
            f"{' and '.join(map(repr, needs_two))} need{'s' if len(needs_two) == 1 else ''} at least 2 datapoints "
            "(a spread over x); set evaluate.num_points to 2 or more",
            ("evaluate.num_points",),
        )
    if "iwae_curve" in diagnostics and not recipe.evaluate.diagnostic_ks:
        raise _key_error("evaluate.diagnostic_ks", "'iwae_curve' needs at least one k, e.g. [1, 10, 100]",
                         ("evaluate.diagnostics",))
    if recipe.evaluate.ais.init == "ffg" and "ffg" not in (*recipe.evaluate.families, m.encoder):
        raise _key_error(
            "evaluate.ais.init",
            "'ffg' starts AIS at the fitted q*_FFG; add ffg to evaluate.families or use 'prior'",
            ("evaluate.families", "model.encoder"),
        )


def _check_data(d: DataConfig) -> None:
    """The keys of your own data (dataset "files") and those of the built-in datasets, each where it applies."""
    if d.dataset == "files":
        if d.path is None:
            raise _key_error(
                "data.dataset",
                "'files' reads your own images from data.path; set it to a .npz, a .npy or a folder of PNG/JPEG images",
                ("data.path",),
            )
        if not d.path.strip():
            raise _key_error("data.path", "is empty; name a .npz, a .npy or a folder of PNG/JPEG images")
        for key, value in (("data_dir", d.data_dir), ("download", d.download)):
            if value not in (None, False):
                raise _key_error(
                    f"data.{key}", "applies to the built-in datasets; dataset 'files' reads data.path: drop it",
                    ("data.dataset",),
                )
    else:
        for key in ("path", "sha256", "num_test"):
            if getattr(d, key) is not None:
                raise _key_error(
                    f"data.{key}", f"applies to your own data (dataset 'files'), not {d.dataset!r}: "
                    "drop it, or set data.dataset: files", ("data.dataset",),
                )
    if d.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", d.sha256):
        raise _key_error(
            "data.sha256",
            f"expected a SHA-256 (64 hexadecimal digits), got {d.sha256!r}; or null to take the file as it is",
        )


def _anchored(path: str, folder) -> str:
    """``path`` (with ``~`` expanded) made absolute from ``folder``, normalized."""
    return os.path.normpath(os.path.join(folder, os.path.expanduser(path)))


def _anchor_data_path(tree: Dict[str, Any], folder) -> None:
    """Make a recipe file's relative ``data.path`` absolute from the file's folder, in place."""
    section = tree.get("data")
    if isinstance(section, dict) and isinstance(section.get("path"), str) and section["path"].strip():
        section["path"] = _anchored(section["path"], folder)


def _with_data_hash(recipe: Recipe) -> Recipe:
    """``recipe`` with data.path absolute (from the working directory) and data.sha256 filled in from the file.

    Left unset when the file cannot be read: loading the data then says why.
    """
    d = recipe.data
    if d.dataset != "files" or d.path is None:
        return recipe
    path = _anchored(d.path, os.getcwd())
    sha = d.sha256.lower() if d.sha256 is not None else None
    if sha is None:
        from gapbench.data import content_sha256

        try:
            sha = content_sha256(path)
        except (GapbenchError, OSError):
            sha = None
    return dataclasses.replace(recipe, data=dataclasses.replace(d, path=path, sha256=sha))


# ---------------------------------------------------------------- loading

# Where each key of a loaded tree came from, so that an error names the file or the --set to
# fix: {("train", "num_epochs"): source}, a source being ("file", shown path) or
# ("set", "--set text", "dotted.key"). Sections are keyed too (("model",)).
Source = Tuple[str, ...]
Sources = Dict[Tuple[str, ...], Source]

# Top-level keys that are settings rather than sections: a file holding only these is empty.
_SCALAR_KEYS = ("name", "seed", "device", "num_threads")


def _read_yaml(path: Path, shown: Optional[str] = None) -> Dict[str, Any]:
    shown = shown or str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {shown} does not exist; see recipes/ for examples") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {shown}: {exc.__class__.__name__}; pass a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{shown}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _record(sources: Sources, node: Mapping, prefix: Tuple[str, ...], source: Source) -> None:
    """Mark every key under ``node`` (sections and values) as coming from ``source``."""
    for key, value in node.items():
        path = prefix + (str(key),)
        sources[path] = source
        if isinstance(value, Mapping):
            _record(sources, value, path, source)


def _load_tree(path: Path, shown: str, seen: Tuple[Path, ...] = ()) -> Tuple[Dict[str, Any], Sources]:
    """The merged tree of ``path`` and its bases, and where each key came from; ``shown`` names the file."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{shown}: 'base' chain loops back to itself")
    data = _read_yaml(path, shown)
    _anchor_data_path(data, path.parent)
    base = data.pop("base", None)
    merged: Dict[str, Any] = {}
    sources: Sources = {}
    bases = [] if base is None else base if isinstance(base, list) else [base]
    for item in bases:
        if not isinstance(item, str):
            raise RecipeError(f"{shown}: base: expected a file name or a list of them, got {base!r}")
        base_path = (path.parent / item) if not os.path.isabs(item) else Path(item)
        if not base_path.exists():
            raise RecipeError(
                f"{shown}: base: {item} does not exist (looked for {base_path.resolve()}); fix the base: line"
            )
        base_shown = item if os.path.isabs(item) else os.path.normpath(os.path.join(os.path.dirname(shown), item))
        tree, found = _load_tree(base_path, base_shown, seen + (path,))
        merged = _merge(merged, tree)
        sources.update(found)
    _record(sources, data, (), ("file", shown))
    return _merge(merged, data), sources


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.num_epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.num_epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply(tree: Dict[str, Any], overrides: Iterable[str], sources: Sources) -> Dict[str, Any]:
    """``tree`` with each override applied in order, recording each as the source of what it set."""
    tree = _merge({}, tree)
    for text in overrides:
        parts, value = parse_override(text)
        source = ("set", f"--set {text}", ".".join(parts))
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
                sources[tuple(parts[: i + 1])] = source
            node = child
        node[parts[-1]] = value
        sources[tuple(parts)] = source
        if isinstance(value, Mapping):
            _record(sources, value, tuple(parts), source)
    return tree


def apply_overrides(tree: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """``tree`` with each ``section.key=value`` override applied in order (a new tree)."""
    return _apply(tree, overrides, {})


def recipe_from_dict(tree: Mapping[str, Any]) -> Recipe:
    """Validate a plain mapping (as read from YAML) into a :class:`Recipe`.

    Sections and keys left out take their defaults; only files (:func:`load_recipe`)
    must name their data.
    """
    recipe = _build(Recipe, _with_procedure(tree))
    _check_consistency(recipe)
    return recipe


def _with_procedure(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """``tree`` with evaluate.local's unset keys filled from its procedure's preset ("paper")."""
    evaluate = tree.get("evaluate")
    local = evaluate.get("local") if isinstance(evaluate, Mapping) else None
    if not isinstance(local, Mapping) or local.get("procedure") != "paper":
        return tree
    return {**tree, "evaluate": {**evaluate, "local": {**PAPER_LOCAL, **local}}}


def _source_of(sources: Sources, key: Optional[str]) -> Optional[Source]:
    """Where the value at dotted ``key`` (list indices ignored) was set; None when it is a default."""
    if not key:
        return None
    return sources.get(tuple(re.sub(r"\[\d+\]", "", key).split(".")))


def _located(exc: RecipeError, sources: Sources, shown: str) -> RecipeError:
    """``exc`` prefixed with where its value came from: the ``--set`` that gave it, else the file."""
    source = _source_of(sources, exc.key)
    if source is not None and source[0] == "set":
        _, text, set_key = source
        detail = exc.problem if exc.problem is not None and exc.key == set_key else str(exc)
        return RecipeError(f"{text}: {detail}")
    where = source[1] if source is not None else shown
    # A consistency error can come from a file's value clashing with a --set of another key.
    sets = []
    for key in exc.related:
        other = _source_of(sources, key)
        if other is not None and other[0] == "set" and other[1] not in sets:
            sets.append(other[1])
    with_sets = f" (with {', '.join(sets)})" if sets else ""
    return RecipeError(f"{where}{with_sets}: {exc}")


def load_recipe(path, overrides: Iterable[str] = (), *, require_data: bool = True) -> Recipe:
    """Read, extend (``base:``), override (``--set``) and validate a recipe file.

    The recipe's ``name`` defaults to the file's stem. A file must describe an
    experiment: one that holds no section (after its bases), or that names no
    ``data.dataset`` (in it, its bases or a ``--set``), is an error rather than a
    run of every default. ``require_data=False`` lifts both checks, for a file read
    only for its evaluation settings. An error names the file, or the ``--set``,
    that holds the bad value.
    """
    path = Path(path)
    shown = str(path)
    tree, sources = _load_tree(path, shown)
    has_section = any(key not in _SCALAR_KEYS for key in tree)
    tree.setdefault("name", path.stem)
    tree = _apply(tree, overrides, sources)
    if require_data and not has_section:
        raise RecipeError(
            f"{shown}: the recipe is empty; it needs at least a data section naming the dataset "
            "(data: {dataset: digits}) and usually model, train and evaluate sections; see recipes/quickstart.yaml"
        )
    try:
        recipe = recipe_from_dict(tree)
    except RecipeError as exc:
        raise _located(exc, sources, shown) from None
    if require_data and ("data", "dataset") not in sources:
        choices = ", ".join(typing.get_args(typing.get_type_hints(DataConfig)["dataset"]))
        raise RecipeError(
            f"{shown}: data.dataset is not given; name the dataset in the data section "
            f"(data: {{dataset: digits}}; one of {choices}) or pass --set data.dataset=NAME"
        )
    return _with_data_hash(recipe)

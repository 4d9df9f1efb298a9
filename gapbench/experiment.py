"""What every stage needs from a recipe or a run folder: the device, the data, the model.

A *run folder* is what ``gapbench train`` writes: ``recipe.yaml`` (resolved),
``checkpoint.pt`` (tensors only), ``meta.json`` and ``train_log.csv``, and
``checkpoints/epoch_<e>.pt`` (weights only) for the epochs of ``train.keep_checkpoints``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from gapbench.errors import GapbenchError
from gapbench.recipe import Recipe, RecipeError, load_recipe

RECIPE_FILE = "recipe.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
TRAIN_LOG_FILE = "train_log.csv"
KEPT_DIR = "checkpoints"  # train.keep_checkpoints: the weights at chosen epochs


def kept_checkpoint_path(run_dir, epoch: int) -> Path:
    """Where the weights kept at the end of ``epoch`` (train.keep_checkpoints) are."""
    return Path(run_dir) / KEPT_DIR / f"epoch_{int(epoch)}.pt"


def kept_epochs(run_dir) -> list:
    """The epochs whose weights the run folder keeps, in order."""
    folder = Path(run_dir) / KEPT_DIR
    names = [p.name[len("epoch_"):-len(".pt")] for p in folder.glob("epoch_*.pt")] if folder.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())

# Seeds of the fixed binarization draws of each split (dynamic and static modes).
_SPLIT_SEED_OFFSET = {"train": 101, "valid": 202, "test": 303}


def configure_threads(recipe: Recipe) -> None:
    """Apply the recipe's CPU thread count (None keeps torch's default)."""
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)


def resolve_device(requested: Optional[str]) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' where there is none is an error."""
    requested = requested or "auto"
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise GapbenchError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    return torch.device(requested)


@dataclass
class Inputs:
    """Model-ready splits [N, C, H, W] in [0, 1], and how training batches are drawn.

    ``*_labels``: each split's int64 class labels [N], row for row with its images; None for a
    dataset without labels.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    image_shape: Tuple[int, ...]
    num_levels: Optional[int]
    dynamic: bool  # True: each training batch is binarized afresh (see ``training_batch``)
    source: str
    description: str
    train_labels: Optional[torch.Tensor] = None
    valid_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def labels(self, name: str) -> Optional[torch.Tensor]:
        """The class labels [N] of split ``name``, or None when the dataset has none."""
        return {"train": self.train_labels, "valid": self.valid_labels, "test": self.test_labels}[name]


def load_inputs(recipe: Recipe) -> Inputs:
    """The recipe's dataset, split and binarized as the recipe says.

    threshold: x > 0.5. static: one Bernoulli draw per split with a fixed seed.
    dynamic: training batches are drawn afresh every epoch (:func:`training_batch`);
    the validation and test splits (and the training split when it is *evaluated*)
    use one fixed-seed draw, the standard practice for reporting.
    """
    from gapbench import data

    d = recipe.data
    if d.dataset == "files":  # your own data: a .npz, a .npy or a folder of images
        ds = data.load_files(
            d.path,
            split_seed=d.split_seed,
            num_valid=d.num_valid,
            num_test=d.num_test,
            quantize_bits=d.quantize_bits,
            sha256=d.sha256,
        )
    else:
        ds = data.load_dataset(
            d.dataset,
            data_dir=d.data_dir,
            download=d.download,
            split_seed=d.split_seed,
            num_valid=d.num_valid,
            quantize_bits=d.quantize_bits,
        )
    train = ds.train if d.num_train is None else ds.train[: d.num_train]
    train_labels = ds.train_labels
    if train_labels is not None and d.num_train is not None:
        train_labels = train_labels[: d.num_train]
    splits = {"train": train, "valid": ds.valid, "test": ds.test}
    if d.binarize in ("threshold", "static", "dynamic"):
        mode = "threshold" if d.binarize == "threshold" else "static"
        for name, x in splits.items():
            gen = torch.Generator().manual_seed(d.split_seed * 1000 + _SPLIT_SEED_OFFSET[name])
            splits[name] = data.binarize(x, mode, generator=gen)
        if d.binarize == "dynamic":
            splits["train"] = train  # kept as grey levels; batches are drawn per epoch
    return Inputs(
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        image_shape=tuple(ds.image_shape),
        num_levels=ds.num_levels,
        dynamic=d.binarize == "dynamic",
        source=str(ds.source),
        description=ds.description,
        train_labels=train_labels,
        valid_labels=ds.valid_labels,
        test_labels=ds.test_labels,
    )


def evaluation_split(inputs: Inputs, recipe: Recipe, name: str) -> torch.Tensor:
    """A split as the gap evaluation sees it: binarized once, with a fixed seed, if dynamic."""
    x = inputs.split(name)
    if inputs.dynamic and name == "train":
        from gapbench import data

        gen = torch.Generator().manual_seed(recipe.data.split_seed * 1000 + _SPLIT_SEED_OFFSET[name])
        x = data.binarize(x, "static", generator=gen)
    return x


def training_batch(inputs: Inputs, x: torch.Tensor, generator: torch.Generator,
                   rows_of: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A training batch as the model sees it: a fresh Bernoulli draw when binarization is dynamic.

    ``rows_of=(total, start)``: x [n, ...] is rows [start, start + n) of a batch of ``total`` (one
    data-parallel process's share); the draw is made for the whole batch and these rows kept, so
    they get what one process would draw for them and ``generator`` advances as for the whole batch.
    """
    if not inputs.dynamic:
        return x
    from gapbench import data

    if rows_of is None:
        return data.binarize(x, "static", generator=generator)
    total, start = rows_of
    whole = x.new_zeros((total,) + tuple(x.shape[1:]))  # the other rows' pixels: placeholders
    whole[start : start + x.shape[0]] = x
    return data.binarize(whole, "static", generator=generator)[start : start + x.shape[0]]


def build_model(recipe: Recipe, inputs: Inputs):
    """The VAE the recipe's ``model`` section describes, for these inputs."""
    from gapbench.models.vae import build_vae

    from gapbench.methods import prepare_model

    kwargs = dataclasses.asdict(recipe.model)
    try:
        model = build_vae(inputs.image_shape, num_levels=inputs.num_levels, **kwargs)
    except ValueError as exc:
        raise RecipeError(f"model: {exc}") from None
    return prepare_model(model, recipe.train)  # what the training method adds (an update network, ...)


@dataclass
class Run:
    """A trained run folder, loaded."""

    path: Path
    recipe: Recipe
    checkpoint: dict
    checkpoint_sha256: str = ""  # of checkpoint.pt's bytes: what every evaluation of it records
    epoch: Optional[int] = None  # a kept checkpoint's epoch (train.keep_checkpoints); None: checkpoint.pt

    @property
    def gaps_dir(self) -> Path:
        """Where the evaluations of these weights go: gaps/, or gaps/epoch_<e>/ for kept weights."""
        from gapbench.gaps_files import GAPS_DIR

        return self.path / GAPS_DIR if self.epoch is None else self.path / GAPS_DIR / f"epoch_{self.epoch}"


def open_run(path, overrides=(), checkpoint: Optional[int] = None) -> Run:
    """Read a run folder's resolved recipe and checkpoint, with clear errors for anything else.

    ``checkpoint``: the weights kept at that epoch (train.keep_checkpoints) instead of checkpoint.pt.
    """
    from gapbench.io import load_torch

    path = Path(path)
    if not path.is_dir():
        raise GapbenchError(f"{path} is not a folder; pass a run folder written by 'gapbench train'")
    if not (path / RECIPE_FILE).is_file() or not (path / CHECKPOINT_FILE).is_file():
        raise GapbenchError(
            f"{path} is not a gapbench run (no {RECIPE_FILE} and {CHECKPOINT_FILE}); train one with 'gapbench train RECIPE --out {path}'"
        )
    recipe = load_recipe(path / RECIPE_FILE, overrides)
    file = path / CHECKPOINT_FILE
    if checkpoint is not None:
        file = kept_checkpoint_path(path, checkpoint)
        if not file.is_file():
            kept = kept_epochs(path)
            raise GapbenchError(
                f"--checkpoint {checkpoint}: {path} keeps no weights of epoch {checkpoint}; "
                + (f"it keeps epochs {', '.join(map(str, kept))}" if kept else
                   "it keeps none (train with --set 'train.keep_checkpoints=[E1, E2]' to keep some)")
            )
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise GapbenchError(f"cannot read {file}: {exc.strerror}") from None
    loaded = load_torch(file, data=data)
    if not isinstance(loaded, dict) or "model" not in loaded:
        raise GapbenchError(f"{file} is not a gapbench checkpoint (no model weights); retrain the run")
    return Run(path=path, recipe=recipe, checkpoint=loaded, checkpoint_sha256=hashlib.sha256(data).hexdigest(),
               epoch=None if checkpoint is None else int(checkpoint))


def load_trained_model(run: Run, inputs: Inputs, device: torch.device):
    """The run's model with its best weights (early stopping) on ``device``, in eval mode."""
    from gapbench.models.vae import load_state

    model = build_model(run.recipe, inputs)
    state = run.checkpoint.get("best_model") or run.checkpoint["model"]
    try:
        load_state(model, state)
    except ValueError as exc:
        where = run.path / CHECKPOINT_FILE if run.epoch is None else kept_checkpoint_path(run.path, run.epoch)
        raise GapbenchError(
            f"{where} does not fit the model of its recipe.yaml ({exc}); "
            "was recipe.yaml edited or the checkpoint copied from another run?"
        ) from None
    return model.to(device).eval()

"""Your own model: the staged, resumable gap evaluation of any model, trained anywhere.

:func:`evaluate_model` runs the evaluation of ``gapbench evaluate-gaps`` on an object that
satisfies the model contract (``latent_dim``, ``log_prior(z)``, ``log_likelihood(x, z)`` with
z [S, N, D] -> [S, N]) and has an encoder, ``posterior(x)`` returning a gapbench Posterior or a
torch Distribution with batch [N] and event [D] (or pass ``encoder``). It writes a run folder
that ``gapbench report`` reads: ``recipe.yaml`` (a record of the settings, not a trainable
recipe), ``meta.json`` and ``gaps/<split>.csv/json``, with the batches under
``gaps/.partial/<split>/``. A rerun with ``resume=True`` reuses a batch only when the model's
state_dict (parameters and buffers), the data, the points, the settings and the code are the
same. :func:`load_model` and :func:`load_data` are what ``gapbench evaluate-model`` uses to
import a model factory (``package.module:factory``), load its weights (tensors only, never
unpickled objects) and read the data.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch

from gapbench.errors import GapbenchError

RECIPE_FILE = "recipe.yaml"
META_FILE = "meta.json"
SPLITS = ("train", "valid", "test")


class _Contract:
    """The user's model seen by the stages: its encoder's q always a gapbench Posterior."""

    def __init__(self, model, encoder: Optional[Callable] = None):
        self.model = model
        self.encoder = encoder if encoder is not None else getattr(model, "posterior", None)

    @property
    def latent_dim(self) -> int:
        return int(self.model.latent_dim)

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_likelihood(self, x, z):
        return self.model.log_likelihood(x, z)

    def posterior(self, x):
        """q(z|x), computed without gradients: the evaluation fits its own q's, never the encoder."""
        from gapbench.models.posterior import Posterior

        with torch.no_grad():
            q = self.encoder(x)
        if isinstance(q, Posterior):
            return q
        if not isinstance(q, torch.distributions.Distribution):
            raise GapbenchError(f"the encoder returned a {type(q).__name__}; return q(z|x) as a torch Distribution "
                                "with batch [N] and event [D], e.g. Independent(Normal(mean, std), 1)")
        try:
            return _FixedPosterior(q)
        except ValueError as exc:
            raise GapbenchError(f"the encoder's q: {exc}") from None


def _fixed_posterior_class():
    from gapbench.models.posterior import DistributionPosterior

    class FixedPosterior(DistributionPosterior):
        """A torch Distribution made without gradients: detached as it is."""

        def detach(self):
            return self

    return FixedPosterior


def _FixedPosterior(dist):
    return _fixed_posterior_class()(dist)


def state_sha256(model: torch.nn.Module) -> str:
    """A content hash of a module's state_dict: every parameter's and buffer's name and values."""
    import hashlib

    from gapbench.provenance import tensor_sha256

    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0")
        h.update(tensor_sha256(value).encode() if torch.is_tensor(value) else repr(value).encode())
    return h.hexdigest()


def _check_model(model, encoder) -> None:
    missing = [a for a in ("latent_dim", "log_prior", "log_likelihood") if not hasattr(model, a)]
    if missing:
        raise GapbenchError(f"the model has no {', '.join(missing)}; a model has latent_dim, log_prior(z) and "
                            "log_likelihood(x, z) with z [S, N, D] -> [S, N]")
    if encoder is None and not callable(getattr(model, "posterior", None)):
        raise GapbenchError("the model has no posterior(x); give it one returning q(z|x) (a torch Distribution "
                            "with batch [N] and event [D]), or pass encoder=")
    if not isinstance(model, torch.nn.Module):
        raise GapbenchError(f"the model is a {type(model).__name__}, not a torch.nn.Module; its state_dict "
                            "identifies it for resume: make it a module")


def _settings(evaluate: Mapping, seed: int, latent_dim: int, encoder_family: str, split: str, num_points: int,
              name: str):
    """The evaluation settings as a validated Recipe (its evaluate section as in a recipe file)."""
    from gapbench.recipe import recipe_from_dict

    section = {**dict(evaluate or {}), "split": split}
    section.setdefault("num_points", num_points)
    if "jacobian" in tuple(section.get("diagnostics") or ()):
        raise GapbenchError("evaluate.diagnostics: 'jacobian' needs gapbench's own decoder; it is not available "
                            "for your own model: leave it out")
    recipe = recipe_from_dict({"name": name, "seed": seed,
                               "model": {"latent_dim": latent_dim, "encoder": encoder_family},
                               "evaluate": section})
    return recipe


def evaluate_model(
    model,
    data: Union[torch.Tensor, Mapping[str, torch.Tensor]],
    out,
    evaluate: Optional[Mapping] = None,
    *,
    encoder: Optional[Callable] = None,
    encoder_family: str = "ffg",
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    restart: bool = False,
    name: str = "own model",
    source: Optional[Dict] = None,
    callback: Optional[Callable[[str, float, int], None]] = None,
):
    """Decompose the gaps of your own ``model`` on ``data``; writes the run folder ``out``.

    ``data``: the evaluation points [N, ...] as ``model.log_likelihood`` takes them (evaluated as
    the split ``evaluate['split']``, default test), or a dict of splits ({"test": x, "train": x2}),
    each evaluated in turn. ``evaluate``: the evaluate section of a recipe as a dict (same keys,
    same checks; ``num_points`` defaults to every point). ``encoder``: x -> q(z|x), when the
    model has no ``posterior``; ``encoder_family``: the family of q ("ffg" for a diagonal
    Gaussian), whose local fit gives the amortization gap. ``resume``/``restart`` as in
    ``gapbench evaluate-gaps``. ``name``: the run's label in reports. ``source``: recorded in
    recipe.yaml (what the command line imported). Returns the split's EvalSummary, or a dict of
    them for a dict of splits. The model goes to ``device`` and into eval mode; its parameters'
    gradients are switched off during the evaluation and restored after.
    """
    from gapbench import provenance as prov
    from gapbench.evaluate import _assemble, _compute, _setup, plan_from_parts, select_points
    from gapbench.experiment import Run, resolve_device
    from gapbench.io import write_json, write_text
    from gapbench.lock import command_line, folder_lock
    from gapbench.scale import SINGLE

    _check_model(model, encoder)
    splits = dict(data) if isinstance(data, Mapping) else {dict(evaluate or {}).get("split", "test"): data}
    for split, x in splits.items():
        if split not in SPLITS:
            raise GapbenchError(f"data: unknown split {split!r}; name splits {', '.join(SPLITS)}")
        if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
            raise GapbenchError(f"data[{split!r}]: expected a tensor of datapoints [N, ...], got "
                                f"{type(x).__name__}{'' if not torch.is_tensor(x) else list(x.shape)}")
    contract = _Contract(model, encoder)
    # Every split's settings checked before anything is written.
    recipes = {split: _settings(evaluate or {}, seed, contract.latent_dim, encoder_family, split, int(x.shape[0]),
                                name) for split, x in splits.items()}
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_sha = state_sha256(model)
    results = {}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.to(dev).eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for split, x in splits.items():
            recipe = recipes[split]
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=name))
            x_all = x.detach().float() if not x.is_floating_point() else x.detach()
            idx = select_points(x_all.shape[0], recipe.evaluate.num_points, seed, split)
            cfg = recipe.evaluate
            context = {
                "model_sha256": model_sha,
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "data": {"split": split, "data_sha256": prov.tensor_sha256(x_all),
                         "num_points": int(idx.numel()), "points_sha256": prov.tensor_sha256(idx.long()),
                         "values_sha256": prov.tensor_sha256(x_all[idx])},
                "seed": seed, "batch_size": cfg.batch_size, "encoder_family": encoder_family,
                **prov.code_versions(), "device": dev.type,
            }
            run = Run(path=out, recipe=recipe, checkpoint={}, checkpoint_sha256=model_sha)
            plan = plan_from_parts(run, recipe, dev, x_all, idx, contract, False, None, context)
            with folder_lock(out, command_line()):
                record = {"name": name, "seed": seed, "device": dev.type,
                          "own_model": {"class": context["model_class"], "state_sha256": model_sha,
                                        "latent_dim": contract.latent_dim, "encoder_family": encoder_family,
                                        **(dict(source) if source else {})},
                          "evaluate": recipe.to_dict()["evaluate"]}
                import yaml

                write_text(out / RECIPE_FILE, yaml.safe_dump(record, sort_keys=False, default_flow_style=None))
                write_json(out / META_FILE, {"kind": "own model", "gapbench_version": prov.code_versions()
                                             ["gapbench_version"], "model_sha256": model_sha,
                                             "date": prov.now()})
                started = time.time()
                done = _setup(plan, resume, restart, SINGLE)
                if done is None:
                    _compute(plan, SINGLE, callback, None)
                    done = _assemble(plan, SINGLE, True, started)
            results[split] = done
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return results if isinstance(data, Mapping) else next(iter(results.values()))


def load_model(spec: str, weights) -> torch.nn.Module:
    """``package.module:factory`` called with no arguments, its weights loaded from a state_dict file.

    The module is imported from the current directory or PYTHONPATH; the weights are read as
    tensors only (``torch.load(weights_only=True)``), never unpickled objects.
    """
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise GapbenchError(f"{spec!r}: name the model as package.module:factory, e.g. mymodels:make_vae")
    module_name, attr = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the command, as `python -m` finds it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise GapbenchError(f"{spec}: cannot import {exc.name!r}; run from the folder that holds {module_name} "
                            "or add it to PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise GapbenchError(f"{spec}: module {module_name} has no {attr!r}; name a function or class that builds "
                            "the model")
    if not callable(factory):
        raise GapbenchError(f"{spec}: {attr} is a {type(factory).__name__}, not callable; name a function or class "
                            "that builds the model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise GapbenchError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module; return the model")
    weights = Path(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GapbenchError(f"--weights {weights}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise GapbenchError(f"--weights {weights}: not a weights file torch can read as tensors only "
                            f"({type(exc).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise GapbenchError(f"--weights {weights}: not a state_dict (a mapping of names to tensors); save it with "
                            "torch.save(model.state_dict(), path)")
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"] if extra else [])
        raise GapbenchError(f"--weights {weights} does not fit {spec}() ({'; '.join(parts)}); save the state_dict "
                            "of the model this factory builds")
    wrong = [k for k in ours if tuple(ours[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise GapbenchError(f"--weights {weights} does not fit {spec}(): {k} has shape {list(state[k].shape)}, the "
                            f"model's is {list(ours[k].shape)}")
    model.load_state_dict(state)
    return model


def load_data(path) -> torch.Tensor:
    """The datapoints of a .npy, or of a .npz's array named test or x (or its only array), as floats."""
    path = Path(path)
    if path.suffix not in (".npy", ".npz"):
        raise GapbenchError(f"--data {path}: expected a .npy or .npz file of datapoints [N, ...]")
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GapbenchError(f"--data {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise GapbenchError(f"--data {path}: not a readable numeric array ({exc})".splitlines()[0]) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            key = next((k for k in ("test", "x") if k in names), names[0] if len(names) == 1 else None)
            if key is None:
                raise GapbenchError(f"--data {path}: holds {', '.join(names) or 'no arrays'}; name the datapoints "
                                    "test or x, or keep one array")
            array = loaded[key]
    else:
        array = loaded
    if array.ndim < 1 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.number):
        raise GapbenchError(f"--data {path}: expected numeric datapoints [N, ...], got {array.dtype} "
                            f"{list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array)).float()

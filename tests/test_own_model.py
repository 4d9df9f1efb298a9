"""Your own model: gapbench.evaluate_model and gapbench evaluate-model on a VAE defined outside gapbench."""

import importlib
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

import gapbench
from gapbench.cli import main

MODULE = textwrap.dedent('''
    import math, torch
    from torch import nn

    class VAE(nn.Module):
        def __init__(self, x_dim=6, latent_dim=2, hidden=16):
            super().__init__()
            self.latent_dim = latent_dim
            self.enc = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))
            self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim))

        def posterior(self, x):
            mean, log_var = self.enc(x).chunk(2, dim=-1)
            return torch.distributions.Independent(torch.distributions.Normal(mean, (0.5 * log_var).exp()), 1)

        def log_prior(self, z):
            return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)

        def log_likelihood(self, x, z):
            return torch.distributions.Bernoulli(logits=self.dec(z)).log_prob(x).sum(-1)

    def make_vae():
        torch.manual_seed(0)
        return VAE()

    NOT_CALLABLE = 3
''')

SETTINGS = {"families": ["ffg"], "batch_size": 6, "elbo_samples": 200, "iwae_samples": 200,
            "local": {"max_steps": 300, "check_every": 20, "num_final_samples": 200},
            "ais": {"num_steps": 100, "num_chains": 4}}
SETS = ["--set", "evaluate.families=[ffg]", "--set", "evaluate.batch_size=6", "--set", "evaluate.elbo_samples=200",
        "--set", "evaluate.iwae_samples=200", "--set", "evaluate.local.max_steps=300", "--set",
        "evaluate.ais.num_steps=100", "--set", "evaluate.ais.num_chains=4"]


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A module mymodels_own in tmp_path (the working directory), its weights and data."""
    (tmp_path / "mymodels_own.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels_own", None)
    mod = importlib.import_module("mymodels_own")
    model = mod.make_vae()
    torch.save(model.state_dict(), tmp_path / "vae.pt")
    x = (torch.rand(12, 6, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    np.save(tmp_path / "test.npy", x.numpy())
    yield mod, model, x, tmp_path
    sys.modules.pop("mymodels_own", None)


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "gaps" / ".partial" / "test").glob("*.pt")}


def test_python_entry_gaps_resume_and_provenance(user):
    _, model, x, tmp = user
    out = tmp / "run"
    summary = gapbench.evaluate_model(model, x, out, SETTINGS, device="cpu")
    df = pd.read_csv(out / "gaps" / "test.csv")
    assert len(df) == 12 and summary.summary["num_points"] == 12
    assert np.isfinite(df[["elbo_q", "elbo_ffg", "iwae", "ais", "log_px"]].to_numpy()).all()
    # log p̂(x) >= L[q] up to Monte Carlo noise: L[q]'s standard error from 200 samples
    assert (df["log_px"] >= df["elbo_q"] - 4 * df["elbo_q_se"]).all()
    assert (out / "recipe.yaml").is_file() and (out / "meta.json").is_file()

    before = _mtimes(out)
    assert len(before) == 9  # amortized, local_ffg, iwae, ais: 2 batches each; the AIS sweep
    again = gapbench.evaluate_model(model, x, out, SETTINGS, device="cpu", resume=True)
    assert again.reused and _mtimes(out) == before

    with torch.no_grad():
        model.dec[0].bias[0] += 0.5  # another model: nothing of the first may be reused
    changed = gapbench.evaluate_model(model, x, out, SETTINGS, device="cpu", resume=True)
    assert not changed.reused
    after = _mtimes(out)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)
    assert model.dec[0].bias.requires_grad  # the evaluation gives the model back as it found it


def test_unsupported_diagnostic_is_an_error(user, tmp_path):
    _, model, x, _ = user
    with pytest.raises(gapbench.errors.GapbenchError, match="jacobian"):
        gapbench.evaluate_model(model, x, tmp_path / "bad", {**SETTINGS, "diagnostics": ["jacobian"]})
    assert not (tmp_path / "bad").exists()


def test_cli_and_report(user, capsys):
    *_, tmp = user
    main(["evaluate-model", "mymodels_own:make_vae", "--weights", "vae.pt", "--data", "test.npy", "--out", "mine",
          "--device", "cpu", "-q", *SETS])
    assert "12 test points" in capsys.readouterr().out
    assert len(pd.read_csv(tmp / "mine" / "gaps" / "test.csv")) == 12
    main(["report", "mine", "--out", "rep"])
    table = (tmp / "rep" / "table.md").read_text()
    assert "own model / FFG" in table


@pytest.mark.parametrize("spec, weights, data, message", [
    ("no_such_module_xyz:make", "vae.pt", "test.npy", "cannot import"),
    ("mymodels_own:missing", "vae.pt", "test.npy", "has no 'missing'"),
    ("mymodels_own:NOT_CALLABLE", "vae.pt", "test.npy", "not callable"),
    ("mymodels_own:make_vae", "list.pt", "test.npy", "not a state_dict"),
    ("mymodels_own:make_vae", "other.pt", "test.npy", "does not fit"),
    ("mymodels_own:make_vae", "vae.pt", "data.csv", ".npy or .npz"),
])
def test_cli_errors_are_one_line(user, capsys, spec, weights, data, message):
    *_, tmp = user
    torch.save([torch.zeros(2)], tmp / "list.pt")
    torch.save({"w": torch.zeros(2)}, tmp / "other.pt")
    (tmp / "data.csv").write_text("1,2\n")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate-model", spec, "--weights", weights, "--data", data, "--out", "never", "-q"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp / "never").exists()

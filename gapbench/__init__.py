"""gapbench: measure why a VAE's ELBO falls short of log p(x).

The inference gap log p(x) - L[q] of each datapoint is split into an
approximation gap (the variational family is too simple) and an amortization
gap (the encoder does not find the family's best member), following Cremer,
Li & Duvenaud, "Inference Suboptimality in Variational Autoencoders" (2018).
"""

__version__ = "0.1.0"

__all__ = ["evaluate_model"]


def __getattr__(name):
    # Imported when first used, so `import gapbench` (and the command line) stays light.
    if name == "evaluate_model":
        from gapbench.own_model import evaluate_model

        return evaluate_model
    raise AttributeError(f"module 'gapbench' has no attribute {name!r}")

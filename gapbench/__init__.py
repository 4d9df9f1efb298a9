"""gapbench: measure why a VAE's ELBO falls short of log p(x).

The inference gap log p(x) - L[q] of each datapoint is split into an
approximation gap (the variational family is too simple) and an amortization
gap (the encoder does not find the family's best member), following Cremer,
Li & Duvenaud, "Inference Suboptimality in Variational Autoencoders" (2018).
"""

__version__ = "0.1.0"

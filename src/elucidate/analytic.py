"""Exact denoisers: a Gaussian mixture's and a finite dataset's optimal D(x; sigma) = E[y | y + sigma n = x].

With these, a sampler's error can be measured without training anything: the probability-flow ODE
of the exact denoiser transports N(0, sigma_max^2) to the (noised) data distribution exactly.

May import: denoiser.
"""
from __future__ import annotations

import math

import torch

from .denoiser import batch_sigma

__all__ = ["GaussianMixture", "EmpiricalDenoiser"]


class GaussianMixture:
    """Mixture of K axis-aligned Gaussians in d dimensions.

    ``means`` is ``[K, d]``; ``stds`` is ``[K]`` (isotropic) or ``[K, d]`` (diagonal); ``weights`` is
    ``[K]`` (normalized here). Inputs ``x`` may have any shape ``[B, ...]`` with ``prod(...) = d``.
    """

    def __init__(self, means, stds, weights=None, *, dtype: torch.dtype = torch.float64):
        self.means = torch.as_tensor(means, dtype=dtype)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(self.means.shape)}")
        K, d = self.means.shape
        stds = torch.as_tensor(stds, dtype=dtype)
        if stds.shape == (K,):
            stds = stds[:, None].expand(K, d)
        if stds.shape != (K, d):
            raise ValueError(f"stds must have shape [K] or [K, d] = [{K}, {d}], got {tuple(stds.shape)}")
        if (stds < 0).any():
            raise ValueError("stds must be >= 0")
        self.stds = stds.contiguous()
        weights = torch.full((K,), 1.0 / K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = math.prod(x.shape[1:])
        if per_sample != self.dim:
            raise ValueError(f"x has {per_sample} values per sample but the mixture has d = {self.dim}")
        flat = x.reshape(x.shape[0], self.dim)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per sample but the mixture has d = {self.dim}")
        return flat

    def _posterior(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened x (the mixture's dtype), per-component noisy variances (``[K, d]`` when the batch
        shares one sigma, else ``[B, K, d]``), and log p(x, k; sigma) ``[B, K]``."""
        flat = self._flat(x).to(self.means.dtype)
        shared = self._shared_sigma(x, sigma)
        if shared is not None:
            # [B, K] matrix products instead of [B, K, d] tensors: sum_j (x_j - mu_kj)^2 / v_kj expanded
            # (float64 keeps the cancellation harmless; a sample's result then depends on the batch around
            # it by rounding only, ~1e-15, as matrix products round differently for other batch sizes)
            var = self.stds ** 2 + shared ** 2
            inv = 1.0 / var
            quad = (flat ** 2) @ inv.T - 2.0 * flat @ (self.means * inv).T + (self.means ** 2 * inv).sum(1)
            log_joint = self.weights.log() - 0.5 * (quad + var.log().sum(1) + self.dim * math.log(2 * math.pi))
        else:
            sigma = batch_sigma(sigma, x).to(self.means.dtype)
            var = self.stds[None] ** 2 + sigma[:, None, None] ** 2  # Var of y + sigma n within component k
            diff = flat[:, None, :] - self.means[None]
            log_joint = (self.weights.log()[None]
                         - 0.5 * (diff ** 2 / var + var.log() + math.log(2 * math.pi)).sum(-1))
        return flat, var, log_joint

    def _shared_sigma(self, x: torch.Tensor, sigma) -> float | None:
        """sigma as one float when every sample has the same positive one (what samplers pass) and the
        mixture is float64, else None (the general path)."""
        if self.means.dtype != torch.float64:
            return None
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if s.numel() == 0 or (s.numel() != 1 and not (s.numel() == x.shape[0] and bool((s == s[0]).all()))):
            return None
        value = float(s[0])
        return value if value > 0 else None

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p(x; sigma): the density of data + sigma-noise, per sample ``[B]``."""
        _, _, log_joint = self._posterior(x, sigma)
        return torch.logsumexp(log_joint, dim=1).to(x.dtype)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """p(k | x; sigma) as ``[B, K]``."""
        _, _, log_joint = self._posterior(x, sigma)
        return (log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)).exp()

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact E[y | y + sigma n = x], same shape and dtype as ``x``."""
        flat, var, log_joint = self._posterior(x, sigma)
        # Within component k: E[y | x, k] = mu_k + gain_k (x - mu_k), gain_k = s_k^2 / (s_k^2 + sigma^2);
        # the result is sum_k p(k | x) E[y | x, k]
        if var.ndim == 2:  # one sigma: as matrix products
            resp = torch.softmax(log_joint, dim=1)  # p(k | x) [B, K]
            gain = self.stds ** 2 * (1.0 / var)
            out = resp @ (self.means * (1.0 - gain)) + flat * (resp @ gain)
        else:
            resp = (log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)).exp()
            gain = self.stds[None] ** 2 / var
            out = (resp[:, :, None] * (self.means[None] + gain * (flat[:, None, :] - self.means[None]))).sum(1)
        return out.to(x.dtype).reshape(x.shape)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2 (eq. 3)."""
        view = (-1,) + (1,) * (x.ndim - 1)
        return (self.denoise(x, sigma) - x) / batch_sigma(sigma, x).reshape(view) ** 2

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               return_labels: bool = False):
        """``n`` draws ``[n, d]`` (and their component labels if ``return_labels``)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        y = self.means[labels] + self.stds[labels] * eps
        return (y, labels) if return_labels else y

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely component of each (clean) sample ``[B]``."""
        return self.responsibilities(x, 0.0).argmax(dim=1)

    def conditional(self, observed: torch.Tensor, keep: torch.Tensor) -> GaussianMixture:
        """The exact distribution of the coordinates where ``keep`` is False given ``observed`` where it is True
        (inpainting's target): a mixture with weights p(k | x_keep) and, the components being axis-aligned, each
        component's own mean and spread on the missing coordinates (Bishop 2006, eq. 2.81-2.82 with zero covariance)."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        observed = torch.as_tensor(observed, dtype=self.means.dtype).reshape(-1)
        if keep.numel() != self.dim or observed.numel() != self.dim or keep.all() or not keep.any():
            raise ValueError(f"keep and observed need {self.dim} values each, with some coordinates kept and some not")
        var = self.stds[:, keep] ** 2  # log p(x_keep, k) = log w_k + log N(x_keep; mu_k, diag s_k^2)
        log_w = self.weights.log() - 0.5 * ((observed[keep] - self.means[:, keep]) ** 2 / var + var.log()).sum(1)
        return GaussianMixture(self.means[:, ~keep], self.stds[:, ~keep], log_w.softmax(0), dtype=self.means.dtype)


class EmpiricalDenoiser:
    """The optimal denoiser of a finite dataset: a softmax-weighted average of the training points.

    Its ODE reproduces training samples exactly (memorization), which makes it the reference for
    "what would a perfect network do on this data".
    """

    def __init__(self, data: torch.Tensor, *, chunk: int = 4096):
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [N, ...] with N >= 1, got {tuple(data.shape)}")
        self.shape = tuple(data.shape[1:])
        self.data = data.reshape(data.shape[0], -1)
        self.chunk = chunk

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.data.shape[1]:
            raise ValueError(f"x has {flat.shape[1]} values per sample but the data has {self.data.shape[1]}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        data = self.data.to(device=x.device, dtype=dtype)
        sigma = batch_sigma(sigma, x).to(dtype)[:, None]
        flat = flat.to(dtype)
        # log w_i = -|x - y_i|^2 / (2 sigma^2), softmax over i, streamed over chunks of the dataset
        out, norm, top = 0, 0, None
        for start in range(0, data.shape[0], self.chunk):
            block = data[start:start + self.chunk]
            logits = -torch.cdist(flat, block, compute_mode="donot_use_mm_for_euclid_dist").square() / (2 * sigma ** 2)
            block_top = logits.max(dim=1, keepdim=True).values
            new_top = block_top if top is None else torch.maximum(top, block_top)
            if top is not None:
                rescale = (top - new_top).exp()
                out, norm = out * rescale, norm * rescale
            w = (logits - new_top).exp()
            out = out + w @ block
            norm = norm + w.sum(dim=1, keepdim=True)
            top = new_top
        return (out / norm).to(x.dtype).reshape(x.shape)

    denoise = __call__

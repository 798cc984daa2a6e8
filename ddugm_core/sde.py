"""Variance-exploding SDE: dx = sqrt(d[sigma^2]/dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VESDE:
    sigma_min: float = 0.01
    sigma_max: float = 4.0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def discrete_sigmas(self, n: int, eps: float = 1e-5, device=None) -> torch.Tensor:
        """Noise levels of an n-step reverse schedule, t = 1 -> eps (descending)."""
        t = torch.linspace(1.0, eps, n, device=device, dtype=torch.float64)
        return self.sigma(t).float()

    @staticmethod
    def noise(shape, generator: torch.Generator, device=None) -> torch.Tensor:
        """Complex Gaussian noise, unit variance in each real component (the networks see 2 real channels)."""
        return torch.complex(torch.randn(shape, generator=generator, device=device),
                             torch.randn(shape, generator=generator, device=device))

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training noise levels, log-uniform on [sigma_min, sigma_max]."""
        u = torch.rand(n, generator=generator, device=device)
        return torch.exp(math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min)))

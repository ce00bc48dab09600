"""Fréchet Inception Distance as pure math over feature statistics (no network here).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", eq. 6) is the Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature sets:

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

The trace of the matrix square root is computed without a general (non-symmetric) sqrtm: with
A = S_1^{1/2} (symmetric, from an eigendecomposition), S_1 S_2 = A (A S_2 A) A^{-1} is similar to the
symmetric PSD matrix A S_2 A, so tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(A S_2 A)). That needs only
``eigh`` in float64, is exact for singular covariances (fewer samples than feature dimensions) and never
produces the complex parts or NaNs that ``scipy.linalg.sqrtm`` can.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_atomic


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of (N, D) features; the covariance is the unbiased one (ddof=1), as in the FID paper's
        reference code. N >= 2."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ConfigError(f"features must be an (N, D) array with N >= 2, got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ConfigError("features contain NaN or infinite values")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), count=f.shape[0])

    def save(self, path: str | os.PathLike, **info: str) -> Path:
        """Write ``mu``, ``sigma``, ``count`` (and string ``info``) as an .npz file through ``io.atomic`` (an
        OutputError naming the file if it cannot be written)."""
        extra = {f"info_{k}": np.array(str(v)) for k, v in info.items()}

        def write(tmp: Path) -> None:
            np.savez(tmp, mu=self.mu, sigma=self.sigma, count=np.array(self.count), **extra)

        return write_atomic(path, write, what="statistics")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics from an .npz with arrays ``mu`` and ``sigma`` (``count`` optional); no pickles."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"statistics file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with data:
                mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
                count = int(data["count"]) if "count" in data else 0
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"{path}: not a statistics file with arrays 'mu' and 'sigma' ({e})") from None
        _check_stats(mu, sigma, str(path))
        return cls(mu=mu, sigma=sigma, count=count)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"{name}: statistics contain NaN or infinite values")


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S_1 S_2)^{1/2}) for symmetric PSD S_1, S_2, via the similar symmetric matrix S_1^{1/2} S_2 S_1^{1/2}."""
    a = _sqrt_psd(np.asarray(sigma1, np.float64))
    m = a @ np.asarray(sigma2, np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance d^2 between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ConfigError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # >= 0 in exact arithmetic; clip rounding noise


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of feature statistics."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature arrays."""
    return fid_from_stats(FeatureStats.from_features(features_a), FeatureStats.from_features(features_b))

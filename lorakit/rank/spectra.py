"""The quantities of the LoRA paper's §7 (Hu et al., 2021), for one weight update ΔW at a time.

    singular values      σ₁ ≥ σ₂ ≥ ... of ΔW
    effective rank       the fewest directions k with σ₁² + ... + σ_k² ≥ energy · ‖ΔW‖²_F (energy 0.9, 0.99)
    amplification        ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, U and V the top-r left and right singular vectors of ΔW: how much
                         ΔW amplifies directions that W itself hardly uses (the paper's Table 7); the baseline is the
                         same with U, V drawn from a random Gaussian matrix of W's shape
    subspace similarity  φ(A₁, A₂, i, j) = ‖U₁,ᵢᵀ U₂,ⱼ‖²_F / min(i, j), U the right singular vectors of each A (or
                         of each ΔW): 1 when the top-i directions of one hold the top-j of the other, 0 when orthogonal

Everything is computed in float64: small singular values of a rank-deficient ΔW are at round-off level in float32.
"""

from __future__ import annotations

import torch


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """σ of a (d_out, d_in) matrix, descending, float64."""
    return torch.linalg.svdvals(delta.double())


def rank_for_energy(sigma: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total (at least 1). A zero matrix: 1."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    power = sigma.double() ** 2
    total = power.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # relative round-off allowance so that energy 1.0 means "the numerical rank", not "all of min(d_out, d_in)"
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def energy_kept(sigma: torch.Tensor, r: int) -> float:
    """The share of ‖ΔW‖²_F the top-r singular directions hold (1.0 for a zero matrix)."""
    power = sigma.double() ** 2
    total = power.sum().item()
    return 1.0 if total == 0 else power[:r].sum().item() / total


def truncated(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, σ_r, V_rᵀ) of the best rank-r approximation of `delta` (Eckart–Young), float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(r, s.shape[0])
    return u[:, :r], s[:r], vh[:r]


def factored_svd(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0):
    """(U, σ, Vᵀ) of scale · B @ A without forming it: B = Q_B R_B, Aᵀ = Q_A R_A, then the SVD of the small
    r × r matrix scale · R_B R_Aᵀ. Exact (up to round-off), and cheap for a large layer. float64; U is (d_out, r)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, dtype=torch.float32):
    """(A, B) = (√σ Vᵀ, U √σ): the singular values split evenly, so that both factors have one scale for training."""
    root = s.sqrt()
    return (root[:, None] * vh).to(dtype).contiguous(), (u * root[None, :]).to(dtype).contiguous()


def amplification(delta: torch.Tensor, weight: torch.Tensor, r: int, seed: int = 0) -> dict:
    """The paper's amplification factor of `delta` on `weight` (both (d_out, d_in)) with ΔW's top-r singular vectors,
    beside the same for the singular vectors of a random Gaussian matrix of that shape (seeded: reproducible)."""
    delta, weight = delta.double(), weight.double()
    norm = torch.linalg.matrix_norm(delta).item()
    u, _, vh = truncated(delta, r)
    projected = torch.linalg.matrix_norm(u.T @ weight @ vh.T).item()
    g = torch.Generator().manual_seed(seed)
    ru, _, rvh = truncated(torch.randn(weight.shape, generator=g, dtype=torch.float64), r)
    random_projected = torch.linalg.matrix_norm(ru.T @ weight @ rvh.T).item()
    return {"factor": _ratio(norm, projected), "random": _ratio(norm, random_projected),
            "projection_norm": projected, "random_projection_norm": random_projected, "r": int(u.shape[1])}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def right_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of a (k, d) matrix as the rows of a (min(k, d), d) float64 tensor, leading first."""
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return vh


def similarity(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for i = 1..r₁, j = 1..r₂ as an (r₁, r₂) tensor: ‖V₁[:i] V₂[:j]ᵀ‖²_F / min(i, j), from two ordered
    orthonormal bases given as rows, leading direction first (right_singular_vectors of each A, or the Vᵀ of each
    ΔW)."""
    if v1.shape[-1] != v2.shape[-1]:
        raise ValueError(f"cannot compare subspaces of dimension {v1.shape[-1]} and {v2.shape[-1]}")
    v1, v2 = v1.double(), v2.double()
    overlap = (v1 @ v2.T) ** 2
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, v1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, v2.shape[0] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def spectrum(sigma: torch.Tensor, keep: int) -> dict:
    """The top `keep` singular values, effective ranks at 90% and 99% of ‖ΔW‖²_F, and ‖ΔW‖_F, from σ."""
    return {"singular_values": sigma[:keep].tolist(), "effective_rank_90": rank_for_energy(sigma, 0.9),
            "effective_rank_99": rank_for_energy(sigma, 0.99), "norm": sigma.square().sum().sqrt().item()}

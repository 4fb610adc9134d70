"""Iso-C and TSV-M written from their papers (arXiv 2502.04959, 2412.00081) and the authors' code,
in memory: whole tensors, float64, numpy's SVD. Independent of dppa_stream's Gram-matrix streaming.

Task vectors are the inputs as float32 (the papers' dtype), differenced in float64; matrices (2-D
tensors) get the method, every other tensor the mean task vector; merged = base + alpha * that."""

from __future__ import annotations

import numpy as np


def _task_vectors(base: np.ndarray, models: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    b = base.astype(np.float32).astype(np.float64)
    return b, [m.astype(np.float32).astype(np.float64) - b for m in models]


def iso_c(base: np.ndarray, models: list[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    """Iso-C: the sum of the task vectors, its singular values all replaced by their mean."""
    b, tvs = _task_vectors(base, models)
    total = sum(tvs)
    if total.ndim != 2:
        return b + alpha * total / len(tvs)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return b + alpha * s.mean() * (u @ vh)


def tsv_m(base: np.ndarray, models: list[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    """TSV-M as the authors' `compute_and_sum_svd_mem_reduction`: each task vector's top
    int(min(m, n) / T) singular triplets placed side by side (zero-padded to min(m, n)), U and V
    orthogonalised by the SVD (u_u @ v_u is the polar factor), recombined with the kept values."""
    b, tvs = _task_vectors(base, models)
    if b.ndim != 2:
        return b + alpha * sum(tvs) / len(tvs)
    T = len(tvs)
    p = min(b.shape)
    k = int(p * (1 / T))
    sum_u, sum_s, sum_v = np.zeros((b.shape[0], p)), np.zeros(p), np.zeros((p, b.shape[1]))
    for i, d in enumerate(tvs):
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = vh[:k, :]
    u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
    return b + alpha * np.linalg.multi_dot([u_u, v_u, np.diag(sum_s), u_v, v_v])

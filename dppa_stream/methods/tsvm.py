"""TSV-M (Task Singular Vectors: Merge, arXiv 2412.00081), in two passes.

Per matrix and fine-tune i, keep the top k = floor(min(m, n) / T) singular triplets of the delta
D_i = U_i S_i V_i^T; concatenate the U_i, S_i and V_i of the T fine-tunes, replace U_cat and
V_cat by their polar factors (the nearest matrices with orthonormal columns) and return
U_perp diag(S_cat) V_perp^T, times alpha; other tensors get the mean task vector (as the paper's
code). Streamed: pass 1 gathers the Gram of [D_1 | ... | D_T] (every D_i^T D_j, n x n each);
the plan takes V_i, S_i from the diagonal blocks, U_cat^T U_cat = [S_i^-1 V_i^T D_i^T D_j V_j
S_j^-1] from all of them (so polar(U_cat) = U_cat (U_cat^T U_cat)^(-1/2) without U_cat), and
V_cat's polar factor directly; pass 2 is linear in each row: out[r] = [D_i[r] V_i S_i^-1]_i M with
M = (U_cat^T U_cat)^(-1/2) diag(S_cat) V_perp^T.
"""

from __future__ import annotations

import numpy as np

from .isoc import SpectralMethod, inverse_sqrt, spectrum


class TsvM(SpectralMethod):
    name = "tsv_m"
    summary = ("TSV-M: per matrix, each task vector's top 1/T singular triplets, their U and V concatenated and "
               "orthogonalised (polar factors), times alpha; other tensors: base + alpha * mean task vector")
    stacked = True

    def factors(self, gram, o, models):
        n = o[1]
        k = n // models  # the paper's int(min(m, n) * 1/T)
        a, vs, ss = [], [], []
        for i in range(models):
            s, v = spectrum(gram[i * n:(i + 1) * n, i * n:(i + 1) * n])
            s, v = s[:k], v[:, :k]
            a.append(v / s)
            vs.append(v)
            ss.append(s)
        # U_cat^T U_cat, block (i, j) = A_i^T (D_i^T D_j) A_j
        c = np.block([[a[i].T @ gram[i * n:(i + 1) * n, j * n:(j + 1) * n] @ a[j] for j in range(models)]
                      for i in range(models)])
        v_cat = np.concatenate(vs, axis=1)
        v_perp = v_cat @ inverse_sqrt(v_cat.T @ v_cat)
        m = inverse_sqrt(c) @ (np.concatenate(ss)[:, None] * v_perp.T)
        return tuple(a), m

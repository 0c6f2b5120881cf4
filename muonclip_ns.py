"""Newton-Schulz variants for muonclip.py (companion file): Polar Express and Gram Newton-Schulz.

MuonClip's default, Keller Jordan's quintic (muonclip.newton_schulz), never runs these; they are
here to be measured against it (bench.py rows 10 and 12; docs/performance.md) and chosen with
MuonClip(..., ns_variant="polar_express" or "gram"), which imports this file on first use.
"""
import torch

from muonclip import default_ns_dtype, newton_schulz as jordan

# Polar Express (arXiv 2505.16932, Algorithm 1): a different minimax-optimal quintic per iteration,
# each divided by a safety factor 1.01 (a / 1.01, b / 1.01^3, c / 1.01^5; the last one, which later
# iterations repeat, is left as is) so that bf16 rounding cannot push a singular value past the
# interval the next polynomial was fitted on; the input is normalised by 1.01 * its norm likewise.
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    [(a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY ** 3, c / _POLAR_EXPRESS_SAFETY ** 5) for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248))]
    + [(1.875, -1.25, 0.375)])
# "gram": the Polar Express polynomials applied through the small Gram matrix (Dao-AILab's Gram
# Newton-Schulz): after this many iterations the accumulated transform is applied and the Gram matrix
# recomputed from the result, so rounding in the (A, A) products cannot build up over all steps.
GRAM_RESTART = 2
NS_VARIANTS = ("jordan", "polar_express", "gram")


def newton_schulz(G, steps=5, eps=1e-7, dtype=None, variant="polar_express"):
    """muonclip.newton_schulz with another polynomial schedule. variant: "polar_express" (the
    per-step quintics of arXiv 2505.16932) or "gram" (the same quintics iterated on the Gram matrix,
    see _gram_iterations); "jordan" is muonclip's own. G (..., A, B) -> (..., A, B) in `dtype`."""
    if variant not in NS_VARIANTS:
        raise ValueError(f"newton_schulz: variant {variant!r} is not one of {NS_VARIANTS}")
    if variant == "jordan":
        return jordan(G, steps, eps, dtype)
    X = G.to(dtype or default_ns_dtype(G.device.type)).reshape(-1, *G.shape[-2:])   # (N, A, B)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT.contiguous()                                     # (N, B, A), now wide (and laid out so)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * _POLAR_EXPRESS_SAFETY + eps)
    table = POLAR_EXPRESS_COEFFICIENTS
    coefficients = [table[min(i, len(table) - 1)] for i in range(steps)]
    if variant == "gram":
        X = _gram_iterations(X, coefficients)
    else:
        for a, b, c in coefficients:
            A = X @ X.mT                                          # (N, small, small)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)           # b*A + c*A@A
            X = torch.baddbmm(X, B, X, beta=a)                    # a*X + B@X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def _gram_iterations(X, coefficients):
    """The quintic steps X <- p(X X^T) X with p(R) = a I + b R + c R^2, carried out on the (N, m, m)
    Gram matrix R of the wide (N, m, n) X: with X_t = Q_t X_0, Q <- P Q and R <- P R P (P is a
    polynomial in R, so symmetric and commuting with it), and X = Q X_0 at the end. Each step costs
    O(m^3) instead of O(m^2 n), a gain when n >> m; restarted after GRAM_RESTART steps."""
    eye = torch.eye(X.size(-2), dtype=X.dtype, device=X.device)
    Q, R = None, X @ X.mT                                         # Q None: the identity
    for i, (a, b, c) in enumerate(coefficients):
        if i == GRAM_RESTART and Q is not None:
            X, Q = Q @ X, None
            R = X @ X.mT
        P = torch.baddbmm(R, R, R, beta=b, alpha=c) + a * eye     # a I + b R + c R^2, (N, m, m)
        Q = P if Q is None else P @ Q
        R = P @ R @ P
    return X if Q is None else Q @ X

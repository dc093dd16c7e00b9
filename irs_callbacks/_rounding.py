"""Rigorous rounding-error bounds for screened squared Euclidean distances (no imports, no torch).

A screen evaluates the expanded form ``||q||^2 - 2 q.b + ||b||^2`` in a floating-point type with
unit round-off ``u`` (float32: 2^-24) and smallest normal number ``eta`` (float32: 2^-126): the
dot product by a matrix product in any summation order, the squared norms computed in float64
and rounded to the screen type. Against the exact ``||q - b||^2`` its error is at most

    tol(q) = (1 + 1e-6) [(gamma_d + 8 u) (||q||^2 + B) + (4 d + 8) eta],    B = max_b ||b||^2,

with ``gamma_d = d u / (1 - d u)`` (the bound on a d-term dot product, relative to
``sum |q_i b_i| <= (||q||^2 + ||b||^2) / 2``). The dot product, the two norms and the two
additions need ``gamma_d + 5 u``; the other ``3 u`` leave room for the float64 distances the
caller compares with. ``eta`` covers underflow (also with flush-to-zero). When the features
were first rounded to the screen type (float64 features screened in float32), each rounded
vector is within ``u ||x|| + sqrt(d) eta`` of the original, which adds

    4.01 u (||q||^2 + B) + 5 sqrt(d) eta (||q|| + sqrt(B)).

Every function works elementwise on floats, numpy arrays and torch tensors alike.
"""

from __future__ import annotations

F32_UNIT_ROUNDOFF = 2.0 ** -24
F32_TINY = 2.0 ** -126  # smallest normal float32
F64_UNIT_ROUNDOFF = 2.0 ** -53
F64_TINY = 2.0 ** -1022


def gamma(n: int, u: float = F32_UNIT_ROUNDOFF) -> float:
    """``n u / (1 - n u)``: relative error bound of an n-term sum or dot product."""
    if n * u >= 1:
        raise ValueError(f"no rounding bound for {n} terms at unit round-off {u}")
    return n * u / (1 - n * u)


def screen_tolerance(sqnorm_q, sqnorm_max: float, d: int, *, u: float = F32_UNIT_ROUNDOFF,
                     tiny: float = F32_TINY, rounded_inputs: bool = False):
    """Bound on |screened - exact| squared distance for queries with squared norms ``sqnorm_q``.

    ``sqnorm_max`` is the largest squared norm on the other side; see the module docstring.
    """
    rel = gamma(d, u) + 8 * u
    tol = rel * (sqnorm_q + sqnorm_max) + (4 * d + 8) * tiny
    if rounded_inputs:
        tol = tol + 4.01 * u * (sqnorm_q + sqnorm_max) + 5 * d ** 0.5 * tiny * (sqnorm_q ** 0.5 + sqnorm_max ** 0.5)
    return tol * (1 + 1e-6)

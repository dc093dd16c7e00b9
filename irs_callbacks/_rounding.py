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

:func:`screen_tolerance` is the float32 screen above. :func:`product_screen_tolerance` covers a
screen whose operands are rounded to a narrower type (float16, bfloat16, TF32) and accumulated in
float32, IEEE or on tensor cores (with a stated safety margin); its docstring has the derivation.
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


# ------------------------------------------------------------------ product screens (any input precision)
F16_UNIT_ROUNDOFF = 2.0 ** -11
F16_TINY = 2.0 ** -14  # smallest normal float16
BF16_UNIT_ROUNDOFF = 2.0 ** -8
BF16_TINY = 2.0 ** -126  # smallest normal bfloat16 (float32's exponent range)
TF32_UNIT_ROUNDOFF = 2.0 ** -11  # TensorFloat-32 keeps 10 explicit mantissa bits, like float16
#: Tensor-core accumulation is modelled as float32 summation in any order with this unit round-off:
#: 16 x IEEE float32's (see :func:`product_screen_tolerance`).
TENSOR_CORE_SAFETY = 16
TENSOR_CORE_UNIT_ROUNDOFF = TENSOR_CORE_SAFETY * F32_UNIT_ROUNDOFF


def product_screen_tolerance(sqnorm_q, sqnorm_max: float, d: int, *, input_unit: float,
                             accumulation_unit: float = F32_UNIT_ROUNDOFF, floor_q=0.0, floor_b: float = 0.0,
                             accumulation_floor=0.0, key_floor=2.0 ** -125, output_unit: float = 0.0,
                             norm_unit: float = F32_UNIT_ROUNDOFF, cosine: bool = False):
    """Bound on |screened key - exact key| of a matrix-product screen with rounded inputs.

    The screened key of query q and bank row b (both already centred by the same vector, which
    leaves every Euclidean distance unchanged) approximates ``K = ||b||^2 - 2 q.b``, so that
    ``K + ||q||^2 = ||q - b||^2``. It is computed as

        V = fl32( fl32(||b||^2) + f * A ),    A = sum_i qh_i bh_i accumulated in float32,

    (in practice in units scaled by a power of two per query row, which changes nothing below)
    where ``qh = q + dq``, ``bh = b + db`` are the operands rounded to the screen type
    (``|dq_i| <= u |q_i| + t_q``, ``|db_i| <= u |b_i| + t_b``: unit round-off ``input_unit`` u,
    absolute floors ``floor_q``/``floor_b`` t for underflow, flush-to-zero and a power-of-two
    rescaling of stored values included; all in the units of q and b, i.e. a stored copy scaled
    by 2^e has floor ``tiny / 2^e``) and ``f = -2 / (scale_q scale_b)`` is a power of two (exact).
    With ``S = sum |q_i b_i| <= (Q + B) / 2`` (Q = ||q||^2, B = ``sqnorm_max`` >= ||b||^2) and
    ``||q||_1 <= sqrt(d Q)``, ``||b||_1 <= sqrt(d B)``:

    - input rounding: ``|qh.bh - q.b| <= E_in = (2u + u^2) S + (1 + u)(t_q ||b||_1 + t_b ||q||_1) + d t_q t_b``;
    - accumulation: the products of two float16/bfloat16/TF32 numbers are exact in float32 (22
      and 16 significant bits), so a d-term sum in any order (blocked, split-K, pairwise) errs by
      at most ``E_acc = gamma_d(u_acc) sum |qh_i bh_i| + d a`` (a = ``accumulation_floor``: float32
      underflow per operation, in the same units), with
      ``sum |qh_i bh_i| <= (1 + u)^2 S + (1 + u)(t_q ||b||_1 + t_b ||q||_1) + d t_q t_b``;
      for a float32 screen gamma_d also covers the rounded products;
    - ``output_unit`` u_out: a product whose result is rounded to a narrow type (bfloat16 matrix
      products on CPUs return bfloat16) errs by ``u_out |A| <= u_out sum |qh_i bh_i|`` more;
    - the stored ``fl32(||b||^2)`` (computed in float64 from the unrounded centred rows):
      ``(norm_unit + (d + 4) 2^-52) B`` with ``norm_unit`` = u32 (3 u32 when the rows were centred
      in float32, which moves each by at most u32 relative); the final addition ``u32 |V| <= 2.02 u32 (Q + B)`` and an
      underflow in it ``key_floor`` (2^-125 in float32 units, divided by the key's scale);
    - the exact float64 distances the caller compares (``sum (q_i - b_i)^2`` of float64 values,
      within ``gamma_{d+2}(2^-53) * 2 (Q + B)`` of the real value; cosine distances within
      ``(d + 8) 2^-53``): that much more on each side, so that a row whose float64 distance ties
      the winner's is never screened out;
    - ``cosine``: the float64 normalisation of both vectors moves each by at most
      ``(d / 2 + 3) 2^-53`` in norm, which moves the key by at most ``8 (d + 8) 2^-53 (1 + Q + B)``.

    Total: ``tol = (1 + 1e-6) [2 (E_in + E_acc) + (u32 + (d+4) 2^-52) B + 2.02 u32 (Q + B) + key_floor
    + float64 and cosine terms]``.

    Accumulation inside NVIDIA tensor cores is not IEEE-specified: blocks of products are aligned
    to the largest exponent and summed with truncation (Fasi, Higham, Mikaitis and Pranesh, "Numerical
    behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 2021, for V100/T4/A100; Hopper's is
    unpublished). Such a block of n products errs by at most about (n + 1) 2^-23 relative to the
    sum of magnitudes, i.e. about 5x IEEE float32's recursive-summation bound. Callers model
    tensor-core accumulation with ``accumulation_unit = TENSOR_CORE_UNIT_ROUNDOFF`` = 16 x 2^-24,
    a stated safety margin of about 3x over that model. IEEE float32 products (CPU BLAS, CUDA
    SIMT) use ``F32_UNIT_ROUNDOFF``.
    """
    u, t_b, d = float(input_unit), float(floor_b), int(d)
    sqrt_q = sqnorm_q ** 0.5
    sqrt_b = float(sqnorm_max) ** 0.5
    s = (sqnorm_q + sqnorm_max) / 2
    floors = (1 + u) * d ** 0.5 * (floor_q * sqrt_b + t_b * sqrt_q) + d * floor_q * t_b
    e_in = (2 * u + u * u) * s + floors
    products = (1 + u) ** 2 * s + floors  # >= sum |qh_i bh_i|
    e_acc = (gamma(d, accumulation_unit) * (1 + output_unit) + output_unit) * products + d * accumulation_floor
    tol = (2 * (e_in + e_acc) + (norm_unit + (d + 4) * 2.0 ** -52) * sqnorm_max
           + 2.02 * F32_UNIT_ROUNDOFF * (sqnorm_q + sqnorm_max) + key_floor)
    if cosine:
        tol = tol + 2 * (d + 8) * F64_UNIT_ROUNDOFF + 8 * (d + 8) * F64_UNIT_ROUNDOFF * (1 + sqnorm_q + sqnorm_max)
    else:
        tol = tol + 2 * gamma(d + 2, F64_UNIT_ROUNDOFF) * 2 * (sqnorm_q + sqnorm_max)
    return tol * (1 + 1e-6)

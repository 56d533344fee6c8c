"""Comparing the float results of two different code paths.

Two code paths that compute the same function in floating point (transformers' forward and
the lean forward, separate and fused projections, an eager pass and its graph replay) round
differently: each sums its products in its own order, and the BLAS library picks its kernels,
blocking and thread split by processor and thread count. They agree up to rounding, and how
far apart they land depends on the machine, so a fixed tolerance such as 1e-5 is a statement
about one processor. Bitwise equality is asserted only where it is promised: the same code
path run twice, and speculative greedy output against plain greedy output in the engine.

The bound used here is absolute and scaled to the largest magnitude among the expected
values:

    |got - want| <= budget * eps(dtype) * max|want|

because the rounding error of a sum is bounded by the magnitudes of its terms, not of its
result: a logit of 0.02 that is the sum of terms of size 6 carries the error of terms of
size 6, so a relative tolerance on each element would fail on small values that are right.
`budget` counts machine epsilons of that largest magnitude:

- SHALLOW_BUDGET: a few elementwise operations and one short reduction (a softmax over a
  handful of logits). Each step rounds once, by at most one eps of its inputs' magnitude.
- FORWARD_BUDGET: a float32 forward of the tests' small models (a few decoder layers, hidden
  size 64 to 128). Measured on an AMD EPYC at 1 and 2 threads, transformers' float32 forward
  lies 8 to 13 eps of the largest logit from the same model run in float64, and so does the
  lean forward; two paths can err in opposite directions, so their difference reaches about
  twice that (17 eps were seen). 64 leaves a factor of 2 to 4 for other processors' kernels,
  and stays four orders of magnitude below what a wrong computation gives (a missing bias or
  a wrong position moves logits by a good fraction of their magnitude).
  tests/engine/test_model_forward.py checks on every machine that the float32 forward itself
  stays within half this budget of the float64 one, so the budget is checked, not assumed.

A greedy token-level check adds nothing on top: where every logit is within the bound, the
argmax can only differ where the expected top two are within twice the bound of each other,
which is a tie up to rounding.
"""

from __future__ import annotations

import torch

SHALLOW_BUDGET = 8
FORWARD_BUDGET = 64


def rounding_bound(want: torch.Tensor, budget: int) -> float:
    """The largest difference rounding explains between two paths that computed `want`."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    return budget * torch.finfo(want.dtype).eps * scale


def assert_close_up_to_rounding(
    got: torch.Tensor, want: torch.Tensor, budget: int = FORWARD_BUDGET, what: str = ""
) -> None:
    """`got` equals `want` up to the rounding of two code paths (see the module docstring)."""
    assert got.dtype == want.dtype, f"{what}: dtypes differ ({got.dtype} vs {want.dtype})"
    bound = rounding_bound(want, budget)
    torch.testing.assert_close(
        got,
        want,
        rtol=0.0,
        atol=bound,
        msg=lambda m: (
            f"{what}: {m}\n(rounding bound {bound:.3g} = {budget} eps x "
            f"max|want| {want.abs().max().item():.3g})"
        ),
    )

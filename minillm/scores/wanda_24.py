"""`wanda_24`: semi-structured 2:4 Wanda (|W| * ||X||, compared within each output row); see nm_sparsity.py."""

from __future__ import annotations

from . import MethodSpec
from .common import ScoringContext
from .nm_sparsity import apply_nm, check

SPEC = MethodSpec(needs_calibration=True, scores_and_removes=True, zeroes_in_place=True)


def run(ctx: ScoringContext, sparsity: float, original_params: int, alloc, n: int = 2, m: int = 4) -> list[dict]:
    check(sparsity, n, m)
    return [apply_nm(ctx, True, n, m)]

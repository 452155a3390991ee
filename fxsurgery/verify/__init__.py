"""Verification: one comparison policy (:mod:`.policy`), numerical validation (:mod:`.validation`) against what
:mod:`.reference` says the rewrite is compared with, the explanation of a failed validation (:mod:`.culprits`), the
ONNX cross-check (:mod:`.cross_check`) and where a runtime goes wrong (:mod:`.localize`)."""

from __future__ import annotations

from fxsurgery.verify.cross_check import cross_check
from fxsurgery.verify.policy import RTOL, SCALE_FLOOR, compare_outputs
from fxsurgery.verify.validation import random_inputs, validate

__all__ = ["cross_check", "RTOL", "SCALE_FLOOR", "compare_outputs", "random_inputs", "validate"]

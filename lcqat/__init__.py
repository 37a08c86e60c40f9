"""LC-QAT: 2-bit linear-constrained vector quantization (arXiv 2606.10531) for any PyTorch model.

Modules: ``hadamard`` (fast orthogonal transforms), ``lcq_linear`` (``LCQConfig``,
``LCQLinear``, ``apply_lcqat``), ``ptq`` (Hessian-aware initialisation, block fine-tuning),
``codes`` (4 codes per byte), ``pack`` (packed format, ``PackedLCQLinear``), ``kernels`` (Triton, loaded lazily),
``baselines`` (RTN, GPTQ, LSQ), ``api`` (``quantize_model``).
"""

from .api import QuantizeReport, quantize_model
from .baselines import LSQLinear, ScalarQuantLinear, apply_lsq, gptq_quantize, rtn_quantize
from .codes import pack_codes, unpack_codes
from .hadamard import HadamardPlan, hadamard_matrix, hadamard_plan, hadamard_transform, random_signs
from .lcq_linear import LCQConfig, LCQLinear, RoundWithEstimator, apply_lcqat, estimator_grad
from .pack import (
    PackedLCQLinear,
    bits_per_weight,
    export_lcqat,
    load_lcqat,
    to_packed,
)
from .ptq import lcq_ptq_layer, ldlq_round

__all__ = [
    "HadamardPlan",
    "LCQConfig",
    "LCQLinear",
    "LSQLinear",
    "PackedLCQLinear",
    "QuantizeReport",
    "RoundWithEstimator",
    "ScalarQuantLinear",
    "apply_lcqat",
    "apply_lsq",
    "bits_per_weight",
    "estimator_grad",
    "export_lcqat",
    "gptq_quantize",
    "hadamard_matrix",
    "hadamard_plan",
    "hadamard_transform",
    "lcq_ptq_layer",
    "ldlq_round",
    "load_lcqat",
    "pack_codes",
    "quantize_model",
    "random_signs",
    "rtn_quantize",
    "to_packed",
    "unpack_codes",
]

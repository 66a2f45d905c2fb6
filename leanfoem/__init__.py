"""leanfoem: FOEM/GPTQ quantization of LLMs one decoder block at a time, resumable, into standard GPTQ checkpoints.

The public surface is small: `quantize_weight` (one layer), the `leanfoem` command line, and the
classes it returns. Everything else is an implementation detail that may change.
"""

__version__ = "0.1.0"

from .hessian import FactorizationError, HessianAccumulator
from .solver import QuantResult, quantize_weight

__all__ = ["quantize_weight", "QuantResult", "HessianAccumulator", "FactorizationError", "__version__"]

"""msrnn: transformers as bounded-state recurrent models, behind one streaming interface."""

from msrnn.errors import MsrnnError
from msrnn.protocol import StatefulLM, stream_logits, tensor_nbytes

__version__ = "0.1.0"

__all__ = ["MsrnnError", "StatefulLM", "__version__", "stream_logits", "tensor_nbytes"]

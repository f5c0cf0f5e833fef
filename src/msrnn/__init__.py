"""msrnn: transformers as bounded-state recurrent models, behind one streaming interface."""

from msrnn.errors import MsrnnError
from msrnn.protocol import StatefulLM, stream_logits, tensor_nbytes
from msrnn.version import __version__


def register_models() -> None:
    """Register every msrnn model type with transformers' Auto classes, so a saved SUPRA, BST or RMT directory
    loads with ``AutoModelForCausalLM.from_pretrained(dir)`` (``AutoModel`` for the encoder RMT) after a plain
    ``import msrnn``. Loading without msrnn installed (``trust_remote_code`` / ``auto_map``) is not supported.

    Runs at import. Under a transformers release outside the tested range it registers nothing, and the first
    msrnn call that touches transformers raises the clean version error instead of ``import msrnn`` failing."""
    import importlib

    from msrnn.compat import CompatError, check_transformers_version
    from msrnn.models.loading import MODEL_TYPE_MODULES

    try:
        check_transformers_version()
    except CompatError:
        return
    for module in MODEL_TYPE_MODULES.values():
        importlib.import_module(module)


register_models()

__all__ = ["MsrnnError", "StatefulLM", "__version__", "register_models", "stream_logits", "tensor_nbytes"]

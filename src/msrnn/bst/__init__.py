"""Block-State Transformer: an SSM over the whole sequence feeding context states to a block transformer."""

from msrnn.bst.config import BSTConfig
from msrnn.bst.convert import from_llama
from msrnn.bst.lm import BSTLM, load_bst
from msrnn.bst.modeling import BSTForCausalLM

__all__ = ["BSTLM", "BSTConfig", "BSTForCausalLM", "from_llama", "load_bst"]

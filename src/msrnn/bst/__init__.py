"""Block-State Transformer: an SSM over the whole sequence feeding context states to a block transformer.

Paper: Fathi et al., "Block-State Transformers", NeurIPS 2023, https://arxiv.org/abs/2306.09539. There is no
official code; this follows the paper and its appendix pseudocode (with its FFT axis and normalisation fixed, see
``msrnn.ssm.conv``). Variants SH / MH / MF, and the SLIDE and full-attention baselines.
"""

from msrnn.bst.config import BSTConfig
from msrnn.bst.convert import from_llama
from msrnn.bst.lm import BSTLM, load_bst
from msrnn.bst.modeling import BSTForCausalLM

__all__ = ["BSTLM", "BSTConfig", "BSTForCausalLM", "from_llama", "load_bst"]

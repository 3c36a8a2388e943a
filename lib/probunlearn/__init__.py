"""probunlearn: a notebook-first companion to probabilistic evaluation and control of LLM unlearning.

Papers reproduced at small scale (see README.md):
[P1] Scholten et al., ICLR 2025; [P2] Wang et al., arXiv 2406.09179; [P3] Yao et al., arXiv 2310.10683.
"""

from probunlearn.utils import quiet_bitsandbytes, set_seed

quiet_bitsandbytes()  # before peft imports bitsandbytes: notices a reader cannot act on

__version__ = "0.1.0"
__all__ = ["set_seed", "__version__"]

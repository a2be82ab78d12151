"""Pure tensor math shared by every role: no Ray, no I/O."""

from rlft.algorithms.sft import SFTLoss, token_logprobs

__all__ = ["SFTLoss", "token_logprobs"]

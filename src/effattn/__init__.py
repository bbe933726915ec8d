"""effattn: efficient self-attention for long sequences behind one interface.

>>> import torch, effattn
>>> q = k = v = torch.randn(1, 4, 4096, 64)
>>> out = effattn.attention(q, k, v, method="lsh", n_hashes=4, chunk_len=64, seed=0)
"""

from effattn import result_pool
from effattn.allocator import retain_freed_memory
from effattn.api import attention, get, methods
from effattn.nn import (
    CausalLM,
    ChunkedFeedForward,
    EncoderClassifier,
    MultiheadAttention,
    ReversibleBlock,
    ReversibleSequence,
    TransformerBlock,
    TransformerStack,
    ViT,
)

__all__ = [
    "attention", "get", "methods", "retain_freed_memory", "result_pool",
    "MultiheadAttention", "TransformerBlock", "ChunkedFeedForward", "ReversibleBlock",
    "ReversibleSequence", "TransformerStack", "EncoderClassifier", "CausalLM", "ViT",
]
__version__ = "0.1.0"

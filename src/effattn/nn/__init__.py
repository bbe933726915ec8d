"""Layers and models built on any registered attention method."""

from effattn.nn.attention import MultiheadAttention
from effattn.nn.block import AttentionBranch, FeedForwardBranch, TransformerBlock
from effattn.nn.classifier import EncoderClassifier, masked_mean
from effattn.nn.embedding import TokenEmbedding
from effattn.nn.feedforward import ChunkedFeedForward, FeedForward
from effattn.nn.lm import IGNORE_INDEX, CausalLM, next_token_targets
from effattn.nn.positional import LearnedPositional, Rotary, SinusoidalPositional, sinusoidal_table
from effattn.nn.reversible import ReversibleBlock, ReversibleSequence
from effattn.nn.stack import TransformerStack
from effattn.nn.swin import PatchMerging, SwinStages, swin_layer_options
from effattn.nn.vit import ViT

__all__ = [
    "MultiheadAttention", "TransformerBlock", "AttentionBranch", "FeedForwardBranch",
    "FeedForward", "ChunkedFeedForward", "LearnedPositional", "SinusoidalPositional", "Rotary",
    "sinusoidal_table", "ReversibleBlock", "ReversibleSequence", "TransformerStack",
    "TokenEmbedding", "EncoderClassifier", "CausalLM", "ViT", "masked_mean",
    "next_token_targets", "IGNORE_INDEX", "swin_layer_options", "PatchMerging", "SwinStages",
]

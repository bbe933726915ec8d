"""Attention mechanisms, one module per family; each registers its method names.

Modules here are imported automatically by :func:`effattn.api.methods` /
:func:`effattn.api.attention` (every non-underscore module), so adding a family
never touches a central list.
"""

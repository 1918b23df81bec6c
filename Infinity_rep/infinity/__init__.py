"""Infinity: bitwise visual-autoregressive text-to-image model (inference path).

Section references in this package (``ARCHITECTURE §5``, ``§2.3``) point to the architecture and inference
specification in ``docs/infinity_architecture.md``; the golden test vectors it describes are in
``tests/data/infinity/golden``.
"""

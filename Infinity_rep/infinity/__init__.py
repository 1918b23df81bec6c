"""Infinity: bitwise visual-autoregressive text-to-image model (inference path)."""

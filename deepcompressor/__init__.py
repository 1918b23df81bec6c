"""VAR-Compressor: post-training quantization for Infinity."""

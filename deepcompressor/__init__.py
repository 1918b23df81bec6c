"""VAR-Compressor: post-training quantization for Infinity.

    from deepcompressor import load_config, load_quantized, quantize

``quantize(pipeline, config, out_dir=...)`` runs PTQ on a loaded pipeline and returns it quantized;
``load_quantized(artifact_dir)`` builds a ready pipeline from artifacts alone (see ``deepcompressor.api``);
``validate(config)`` checks a config built in code; ``deepcompressor.presets`` holds the shipped YAML files.
"""

from .api import load_quantized, quantize, validate
from .config import load_config

__all__ = ["load_config", "load_quantized", "quantize", "validate"]

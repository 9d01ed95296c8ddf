"""The configurable transformer of seed 003: encoder, decoder and forecaster over continuous series.

    config.py       TransformerConfig: every option of the seed's feature matrix
    norms.py        layer / rms / adaptive norms
    attention.py    multi-head attention with the standard, xformer, flash and frequency kernels
    feedforward.py  dense (SwiGLU or plain) or MoE feed-forward
    blocks.py       encoder and decoder layers and stacks, incremental decoding
    model.py        TransformerForecaster (registry name "TransformerForecaster", task "series_forecast")
"""

from modeling.transformer.blocks import TransformerDecoder, TransformerEncoder
from modeling.transformer.config import TransformerConfig
from modeling.transformer.model import TransformerForecaster

__all__ = ["TransformerConfig", "TransformerDecoder", "TransformerEncoder", "TransformerForecaster"]

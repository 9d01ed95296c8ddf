"""The config of the configurable transformer (seed 003): one dataclass for the encoder, the decoder
and the forecaster that joins them.

Every option of the seed's feature matrix is a field: the attention kernel (`att_type`), the norm
(`norm_type`, `norm_first`, `use_final_norm`), the feed-forward (`activation`, `use_swiglu`, MoE via
`modeling.moe.MoEFields`), `share_layers`, `dropout`, the per-layer `init` and gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling.moe import MoEFields

ATT_TYPES = ("standard", "xformer", "flash", "frequency")
NORM_TYPES = ("layer", "rms", "adaptive")
ACTIVATIONS = ("gelu", "relu", "swish")
INITS = ("xavier", "normal", "depth_scaled")


@dataclass(frozen=True)
class TransformerConfig(MoEFields):
    input_size: int = field(metadata={"help": "features per time step of the context (the series' input columns)"})
    output_size: int = field(metadata={"help": "features per predicted time step (the target columns)"})
    context_length: int = field(metadata={"help": "time steps the encoder reads"})
    pred_length: int = field(metadata={"help": "time steps the decoder predicts in training (predict() takes any length)"})
    d_model: int = field(metadata={"help": "width of the residual stream"})
    nhead: int = field(metadata={"help": "attention heads; must divide d_model"})
    num_layers: int = field(metadata={"help": "layers of the encoder and of the decoder (each; see num_*_layers)"})
    dim_feedforward: int = field(metadata={"help": "hidden width of each feed-forward block (and of each MoE expert)"})
    num_encoder_layers: int | None = field(default=None, metadata={"help": "encoder layers; empty: num_layers"})
    num_decoder_layers: int | None = field(default=None, metadata={"help": "decoder layers; empty: num_layers"})
    dropout: float = field(default=0.0, metadata={
        "help": "training-time dropout on the input embeddings, the attention weights and each residual branch"})
    att_type: str = field(default="standard", metadata={
        "help": "attention kernel: standard (explicit softmax(QK^T)V), xformer (query-chunked, never T x T), "
                "flash (scaled_dot_product_attention, flash backend first), frequency (keys/values as Fourier modes)"})
    xformer_chunk_size: int = field(default=512, metadata={"help": "xformer: queries and keys per block (memory ~ block x block, not T x T)"})
    frequency_modes: int = field(default=32, metadata={
        "help": "frequency: lowest Fourier modes of the keys/values kept (each gives a real and an imaginary token)"})
    norm_type: str = field(default="layer", metadata={
        "help": "layer (LayerNorm), rms (RMSNorm with gain) or adaptive (learned mix of the two, see norms.py)"})
    norm_first: bool = field(default=True, metadata={"help": "pre-norm (True: norm before each sublayer) or post-norm (False)"})
    use_final_norm: bool = field(default=True, metadata={"help": "a norm after the last encoder and decoder layer (pre-norm only)"})
    activation: str = field(default="gelu", metadata={"help": "feed-forward nonlinearity: gelu, relu or swish"})
    use_swiglu: bool = field(default=True, metadata={
        "help": "gated feed-forward: act(x W_gate) * (x W_in) (SwiGLU with swish), else act(x W_in)"})
    share_layers: bool = field(default=False, metadata={
        "help": "one encoder layer and one decoder layer, each applied num_*_layers times (ALBERT-style sharing)"})
    init: str = field(default="xavier", metadata={
        "help": "weight init: xavier (uniform), normal (std 0.02) or depth_scaled (normal, layer l's output "
                "projections / sqrt(2 (l + 1)))"})
    use_gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer in the backward pass to save activation memory"})

    def __post_init__(self):
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.num_layers)  # recorded resolved in the checkpoint
        for name in ("input_size", "output_size", "context_length", "pred_length", "d_model", "nhead", "num_layers",
                     "dim_feedforward", "num_encoder_layers", "num_decoder_layers", "xformer_chunk_size", "frequency_modes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.nhead != 0:
            raise ValueError(f"nhead ({self.nhead}) must divide d_model ({self.d_model})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, valid in (("att_type", ATT_TYPES), ("norm_type", NORM_TYPES), ("activation", ACTIVATIONS), ("init", INITS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        self.check_moe(max(self.num_encoder_layers, self.num_decoder_layers))
        if self.moe_num_experts > 0:
            if self.use_swiglu and self.activation != "swish":
                raise ValueError(f"activation must be swish when use_swiglu and moe_num_experts > 0 "
                                 f"(the experts' gate is SwiGLU), got {self.activation!r}")
            if self.share_layers and self.moe_layers.strip() != "all":
                raise ValueError(f"moe_layers must be 'all' with share_layers (one layer serves every depth), got {self.moe_layers!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @property
    def moe_activation(self) -> str:
        """The experts' activation (modeling/moe.py's names) for this config's feed-forward."""
        if self.use_swiglu:
            return "swiglu"
        return {"gelu": "gelu", "relu": "relu", "swish": "silu"}[self.activation]

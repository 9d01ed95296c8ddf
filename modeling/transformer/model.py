"""The configurable transformer of seed 003 as a forecaster, registered as "TransformerForecaster"
(task "series_forecast").

An encoder reads the context window, a decoder predicts the next pred_length steps from it:

    forward(context (B, Tc, input_size), target (B, Tp, output_size)) -> scalar training loss
    predict(context, pred_length) -> (B, pred_length, output_size), step by step with caches

Teacher forcing: the decoder's input at step 0 is the last context step projected into the target's
space (`start_proj`, a linear input_size -> output_size map), at step t > 0 the true target of step
t - 1; its output at step t predicts target step t. predict() feeds back its own predictions through
`TransformerDecoder.forward_one_step`, so a prediction from step-by-step decoding equals the full
forward on the same inputs. The loss is the mean squared error over every predicted value, plus in
training the weighted MoE load-balancing loss; `last_report` holds its parts (mse, mae).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling import reports
from modeling.layers.moe import MoEMLP, moe_aux_loss
from modeling.registry import ModelSpec, register_model
from modeling.transformer.attention import Attention
from modeling.transformer.blocks import TransformerDecoder, TransformerEncoder
from modeling.transformer.config import TransformerConfig
from modeling.transformer.feedforward import FeedForward

log = logging.getLogger(__name__)

NORMAL_STD = 0.02


class TransformerForecaster(nn.Module):
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]  # the units engines wrap one by one (FSDP)

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.encoder = TransformerEncoder(config)
        self.decoder = TransformerDecoder(config)
        self.start_proj = nn.Linear(config.input_size, config.output_size)
        self.last_report: dict[str, reports.Reported] = {}
        self.attention_kernel: str | None = None  # which kernel(s) the last forward's attention ran
        self._attention_modules = tuple(m for m in self.modules() if isinstance(m, Attention))  # a tuple: not registered
        self._flops_per_step: int | None = None

    # ------------------------------------------------------------------ build

    @torch.no_grad()
    def init_weights(self) -> None:
        """Per `config.init`: every linear layer xavier-uniform, or normal(0.02); depth_scaled is normal
        with the output projections of the layer at depth l (attention outputs, feed-forward output,
        MoE experts' output) shrunk by 1 / sqrt(2 (l + 1)), so deeper layers start closer to the
        identity. Biases start at 0, norms at the identity. Draws from the global RNG (seeded)."""
        init = self.config.init
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=NORMAL_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoEMLP):
                # as a dense feed-forward's matrices; the router is an nn.Linear, initialised above
                std = math.sqrt(2.0 / (self.config.d_model + self.config.dim_feedforward)) if init == "xavier" else NORMAL_STD
                module.init_weights(in_std=std, out_std=std)
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()  # the norms
        if init == "depth_scaled":
            for stack in (self.encoder, self.decoder):
                for depth, layer in enumerate(stack.layers):  # one layer when shared: depth 0
                    out_std = NORMAL_STD / math.sqrt(2 * (depth + 1))
                    for projection in layer.output_projections():
                        if isinstance(projection, MoEMLP):
                            projection.experts.init_weights(in_std=NORMAL_STD, out_std=out_std)
                        else:
                            weight = projection.w_out.weight if isinstance(projection, FeedForward) else projection.weight
                            nn.init.normal_(weight, std=out_std)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.use_gradient_checkpointing = enabled
        self.decoder.use_gradient_checkpointing = enabled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_flops_per_token(self) -> int:
        """Training FLOPs (forward + backward = 3 x forward) per CONTEXT TIME STEP: one sample's
        FLOPs (encoder over context_length steps, decoder over pred_length steps) / context_length.
        So the trainer's throughput must count B x context_length steps per micro-batch.

        Counted by torch's FlopCounterMode on a meta copy (nothing allocated) of one sample, with the
        kernels that compute the same attention counted as standard (its QK^T and AV matmuls, the full
        score matrix, causal masking not discounted: the PaLM MFU convention). FFTs of the frequency
        kernel are not counted (FlopCounterMode has no formula for them; O(T log T), small). An MoE
        layer counts its router and top_k experts: the meta copy is dense (MoE routing reads counts
        back to the host, which a meta tensor cannot) and each MoE feed-forward adds (top_k - 1)
        dense feed-forwards, counted the same way, plus its router.
        """
        if self._flops_per_step is None:
            config = self.config
            att_type = "standard" if config.att_type in ("xformer", "flash") else config.att_type
            dense = dataclasses.replace(config, att_type=att_type, moe_num_experts=0, use_gradient_checkpointing=False)
            with torch.device("meta"):
                model = TransformerForecaster(dense).eval()
                context = torch.zeros(1, config.context_length, config.input_size)
                target = torch.zeros(1, config.pred_length, config.output_size)
                with FlopCounterMode(display=False) as counter:
                    model(context, target)
                total = counter.get_total_flops()
                if config.moe_num_experts > 0:
                    feed_forward = FeedForward(config.d_model, config.dim_feedforward, config.activation, config.use_swiglu)
                    with FlopCounterMode(display=False) as ff_counter:
                        feed_forward(torch.zeros(1, 1, config.d_model))
                    per_step = (config.moe_top_k - 1) * ff_counter.get_total_flops() + 2 * config.d_model * config.moe_num_experts
                    for stack, num_steps in ((self.encoder, config.context_length), (self.decoder, config.pred_length)):
                        num_moe_calls = sum(isinstance(stack.layer_at(depth).feed_forward, MoEMLP) for depth in range(stack.num_layers))
                        total += num_moe_calls * num_steps * per_step
            self._flops_per_step = round(3 * total / config.context_length)
        return self._flops_per_step

    # ------------------------------------------------------------------ run

    def _check_context(self, context: torch.Tensor) -> None:
        if context.dim() != 3 or context.size(2) != self.config.input_size:
            raise ValueError(f"context must be (batch, time, input_size = {self.config.input_size}), got {tuple(context.shape)}")

    def decoder_inputs(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: [last context step projected, target[:, :-1]] -> (B, Tp, output_size)."""
        start = self.start_proj(context[:, -1:])  # (B, 1, output_size)
        return torch.cat([start, target[:, :-1].to(start.dtype)], dim=1)

    def forward(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """context (B, Tc, input_size), target (B, Tp, output_size) -> the mean squared error of the
        teacher-forced predictions (+ the weighted MoE load-balancing loss while training)."""
        self._check_context(context)
        if target.dim() != 3 or target.size(0) != context.size(0) or target.size(2) != self.config.output_size:
            raise ValueError(f"target must be (batch = {context.size(0)}, time, output_size = {self.config.output_size}), "
                             f"got {tuple(target.shape)}")
        memory = self.encoder(context)  # (B, Tc, D)
        prediction = self.decoder(self.decoder_inputs(context, target), memory)  # (B, Tp, output_size)
        error = prediction.float() - target.float()
        mse = error.square().mean()
        self._note_kernels()
        self.last_report = {"mse": reports.mean(mse, error.numel()), "mae": reports.mean(error.abs().mean(), error.numel())}
        if self.config.att_type == "flash":  # 1.0 where every attention ran SDPA's flash backend
            is_flash = float(all(m.kernel == "sdpa:FLASH_ATTENTION" for m in self._attention_modules if m.att_type == "flash"))
            self.last_report["attention/flash_kernel"] = reports.mean(torch.tensor(is_flash), 1)
        aux_loss = moe_aux_loss(self.modules()) if self.training else None
        return mse if aux_loss is None else mse + aux_loss

    @torch.no_grad()
    def predict(self, context: torch.Tensor, pred_length: int | None = None) -> torch.Tensor:
        """context (B, Tc, input_size) -> (B, pred_length, output_size), each step fed its predecessor's
        prediction; the encoder runs once and each decoder step reuses the cached keys and values."""
        self._check_context(context)
        pred_length = self.config.pred_length if pred_length is None else pred_length
        if pred_length < 1:
            raise ValueError(f"pred_length must be >= 1, got {pred_length}")
        memory = self.encoder(context)
        step_input = self.start_proj(context[:, -1:])  # (B, 1, output_size)
        state: dict = {}
        predictions = []
        for _ in range(pred_length):
            step_input, state = self.decoder.forward_one_step(step_input, memory, state)
            predictions.append(step_input)
        self._note_kernels()
        return torch.cat(predictions, dim=1)

    def _note_kernels(self) -> None:
        kernels = ", ".join(sorted({m.kernel for m in self._attention_modules if m.kernel is not None}))
        if kernels != self.attention_kernel:
            log.info("TransformerForecaster att_type %s: attention ran %s", self.config.att_type, kernels)
            self.attention_kernel = kernels


TRANSFORMER_FLAVORS = {
    "debug": dict(input_size=3, output_size=3, context_length=32, pred_length=8, d_model=32, nhead=4, num_layers=2,
                  dim_feedforward=64),
    # the seed's "high-performance time series model", narrower: trains in minutes on a CPU
    "small": dict(input_size=7, output_size=7, context_length=96, pred_length=24, d_model=128, nhead=4, num_layers=3,
                  dim_feedforward=256, att_type="flash", norm_type="rms", activation="swish"),
    # the seed's large-scale configuration: d_model 1024, 16 heads, 12 layers, 4096 wide
    "full": dict(input_size=7, output_size=7, context_length=512, pred_length=96, d_model=1024, nhead=16, num_layers=12,
                 dim_feedforward=4096, att_type="xformer", norm_type="rms", activation="swish",
                 use_gradient_checkpointing=True),
}

register_model(ModelSpec(name="TransformerForecaster", config_cls=TransformerConfig, builder=TransformerForecaster,
                         flavors=TRANSFORMER_FLAVORS, task="series_forecast"))

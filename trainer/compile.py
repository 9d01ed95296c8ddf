"""engine.compile: regional compilation, as torchtitan does it.

Each repeated block of a model (a transformer layer, a conv stage) is compiled on its own instead
of the whole model: blocks of one class share one compiled graph, so compile time does not grow
with depth, and what cannot be traced (an MoE expert dispatch, a KV cache update) breaks the graph
of one block, not the model's. A model names its blocks with `compile_units()`; without it the
items of its `nn.ModuleList`s that have submodules are its blocks.

A block is compiled in place: its `forward` is replaced by the compiled one. The module tree, its
parameter names (no `_orig_mod.` prefix, so checkpoints load into eager models and back) and the
hooks the engines register (ZeRO-3 gathers, FSDP's all-gathers, gradient checkpointing) stay
eager, around the compiled forward. Under torch.inference_mode (generation with a KV cache, whose
shapes and positions change at every call and would recompile each block) blocks run eager. A
block class whose compilation fails runs eager from then on, with one log line naming it.

The trainer compiles before the engine wraps the model; modeling code never calls torch.compile.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from core.config import EngineConfig

log = logging.getLogger("tokfleet.compile")


def is_compile_on(engine_cfg: EngineConfig, device: torch.device) -> bool:
    """engine.compile, with null (auto) meaning on for CUDA and off elsewhere: on a CPU, compiling
    costs ~30 s of a short run for a small model."""
    return engine_cfg.compile if engine_cfg.compile is not None else device.type == "cuda"


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of every nn.ModuleList in `model` that have submodules (a layer, not a bare
    Linear), outermost first: a block's own ModuleLists are part of it."""
    blocks: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for item in child:
                blocks.extend([item] if next(item.children(), None) is not None else find_blocks(item))
        else:
            blocks.extend(find_blocks(child))
    return blocks


def compile_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each block to compile: the model's `compile_units()`, else `find_blocks`."""
    declared: Callable[[], list[nn.Module]] | None = getattr(model, "compile_units", None)
    units = declared() if declared is not None else find_blocks(model)
    names = {id(module): name for name, module in model.named_modules()}
    # a module listed twice (one layer shared by two positions) is compiled once
    return [(names[id(unit)], unit) for unit in {id(unit): unit for unit in units}.values()]


class EagerFallback:
    """Shared by a model's compiled blocks: the first compile error of a block class sends every
    block of that class back to eager and logs one line; the call that failed runs eager."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.blocks_by_class: dict[type, list[tuple[str, nn.Module]]] = {}
        self.failed: set[type] = set()

    def add(self, name: str, block: nn.Module) -> None:
        self.blocks_by_class.setdefault(type(block), []).append((name, block))

    def fail(self, block_class: type, error: Exception) -> None:
        if block_class in self.failed:
            return
        self.failed.add(block_class)
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        blocks = self.blocks_by_class[block_class]
        for _, block in blocks:
            del block.forward  # the instance's compiled forward: the class's eager one shows again
        names = blocks[0][0] if len(blocks) == 1 else f"{blocks[0][0]} and {len(blocks) - 1} more"
        log.warning("engine.compile: %s %s (%s) could not compile and runs eager: %s: %s",
                    self.model_name, block_class.__name__, names, type(error).__name__, reason[:300])


def is_miscompiled(module: nn.Module) -> bool:
    """Ops Inductor gets wrong without an error, which run eager inside a compiled block: average
    pooling with ceil_mode (and count_include_pad) divides the last, overhanging window's gradient
    by the whole kernel (pytorch/pytorch#198119, torch 2.13-2.14; the forward is right)."""
    return isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and module.ceil_mode and module.count_include_pad


def keep_eager(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Run the miscompiled ops (`is_miscompiled`) of `blocks` eager: the compiled graph breaks around them."""
    found = [(f"{name}.{sub_name}", module) for name, block in blocks for sub_name, module in block.named_modules()
             if is_miscompiled(module)]
    for _, module in found:
        module.forward = torch.compiler.disable(module.forward, recursive=False)
    if found:
        names = found[0][0] if len(found) == 1 else f"{found[0][0]} and {len(found) - 1} more"
        log.info("engine.compile: %s %s(ceil_mode=True) (%s) runs eager: Inductor's gradient of it is wrong "
                 "(pytorch/pytorch#198119)", type(model).__name__, type(found[0][1]).__name__, names)


def compile_block(name: str, block: nn.Module, fallback: EagerFallback) -> None:
    """Replace `block.forward` with its compiled version, which falls back to eager on a compile error."""
    eager_forward = block.forward
    compiled_forward = torch.compile(eager_forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():  # generation: shapes and cache positions change every call
            return eager_forward(*args, **kwargs)
        try:
            return compiled_forward(*args, **kwargs)
        except TorchDynamoException as error:  # tracing or the backend failed, not the block's own code
            fallback.fail(type(block), error)
            return eager_forward(*args, **kwargs)

    block.forward = forward
    fallback.add(name, block)


def compile_model(model: nn.Module, engine_cfg: EngineConfig, device: torch.device) -> list[str]:
    """Compile `model`'s blocks in place when engine.compile asks for it (see `is_compile_on`).
    Returns the names of the blocks compiled."""
    if not is_compile_on(engine_cfg, device):
        return []
    model_name = type(model).__name__
    units = compile_units(model)
    if not units:
        log.info("engine.compile: %s has no blocks to compile (no compile_units, no nn.ModuleList of layers); it runs eager",
                 model_name)
        return []
    keep_eager(model, units)
    fallback = EagerFallback(model_name)
    for name, unit in units:
        compile_block(name, unit, fallback)
    classes = sorted({type(unit).__name__ for _, unit in units})
    log.info("engine.compile: %s: %d blocks compiled (%s)", model_name, len(units), ", ".join(classes))
    return [name for name, _ in units]

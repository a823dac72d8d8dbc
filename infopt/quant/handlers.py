"""The quantization formats infopt ships: one :class:`~infopt.quant.quantize.QuantHandler` per
config type.

A new format is a config class (:mod:`.config`), a handler registered here with
:func:`~infopt.quant.quantize.register_quant_handler` (which also makes it
``wrap_model(quant=...)``'s handler for that type) and a
:class:`~infopt.quant.qlinear.QuantizedLinear` subclass with its own ``FORMAT`` (found by
:func:`~infopt.quant.save_quantized` / ``load_quantized`` through that name).
"""

from __future__ import annotations

import functools

import torch.nn as nn

from .awq import awq_block, smooth_block
from .blockwise import BlockFn, collect_stats
from .config import FP8Config, Int4WeightOnlyConfig, Int8WeightOnlyConfig, W8A8Config
from .gptq import gptq_quantize
from .qlinear import FP8Linear, Int4Linear, Int8Linear, W8A8Linear
from .quantize import QuantHandler, register_quant_handler
from .structure import BlockInputs

__all__ = ["FP8Handler", "Int4Handler", "Int8Handler", "W8A8Handler"]


@register_quant_handler(Int8WeightOnlyConfig)
class Int8Handler(QuantHandler):
    """int8 weight-only, per output channel (RTN)."""

    def quantize_linear(self, linear: nn.Linear, config: Int8WeightOnlyConfig) -> nn.Module:
        return Int8Linear.from_linear(linear)


@register_quant_handler(Int4WeightOnlyConfig)
class Int4Handler(QuantHandler):
    """int4 group-wise: RTN, or AWQ / GPTQ block by block; optionally int8 activations."""

    def quantize_linear(self, linear: nn.Linear, config: Int4WeightOnlyConfig) -> nn.Module:
        return Int4Linear.from_linear(linear, config.group_size)

    def calibration(self, config: Int4WeightOnlyConfig) -> tuple[BlockFn, str] | None:
        if config.method == "gptq":
            return functools.partial(_gptq_block, config=config), "GPTQ"
        if config.method == "awq":
            return functools.partial(
                awq_block, group_size=config.group_size, grid=config.awq_grid,
                clip=config.awq_clip, damp=config.awq_damp, sink_weight=config.awq_sink_weight,
            ), "AWQ"  # fmt: skip
        return None

    def finish(self, model: nn.Module, config: Int4WeightOnlyConfig) -> None:
        if config.act_dtype is not None:
            # After calibration: AWQ / GPTQ searched their weights on unrounded activations.
            for m in model.modules():
                if isinstance(m, Int4Linear):
                    m.act_dtype = config.act_dtype


@register_quant_handler(W8A8Config)
class W8A8Handler(QuantHandler):
    """SmoothQuant W8A8: smoothing calibrated block by block."""

    def quantize_linear(self, linear: nn.Linear, config: W8A8Config) -> nn.Module:
        return W8A8Linear.from_linear(linear)  # outside blocks: no smoothing

    def calibration(self, config: W8A8Config) -> tuple[BlockFn, str] | None:
        return functools.partial(smooth_block, alpha=config.alpha), "SmoothQuant"


@register_quant_handler(FP8Config)
class FP8Handler(QuantHandler):
    """fp8 e4m3 weights and per-token activations."""

    def quantize_linear(self, linear: nn.Linear, config: FP8Config) -> nn.Module:
        return FP8Linear.from_linear(linear)


def _gptq_block(
    block: nn.Module, groups: list[list[str]], chunks: BlockInputs, *, config: Int4WeightOnlyConfig
) -> dict[str, nn.Module]:
    mods = dict(block.named_modules())
    new: dict[str, nn.Module] = {}
    stats = collect_stats(block, groups, chunks, with_cov=True,
                          first_token_weight=config.gptq_sink_weight)
    for group, st in zip(groups, stats):
        hessian = 2.0 * st.cov
        for name in group:
            lin = mods[name]
            qweight, scale, zero = gptq_quantize(
                lin.weight, hessian, config.group_size, damp=config.damp,
                block_size=config.block_size, act_order=config.act_order,
            )
            new[name] = Int4Linear.from_quantized(lin, qweight, scale, zero, config.group_size)
    return new

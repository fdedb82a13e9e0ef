"""Mixture-of-experts assembly from a base and its fine-tunes, in mergekit-moe's config format."""

from engine.moe.assemble import MoEResult, plan_moe, run_moe
from engine.moe.config import GATE_MODES, MoEConfig, load_moe_config, parse_moe_text

__all__ = ["GATE_MODES", "MoEConfig", "MoEResult", "load_moe_config", "parse_moe_text", "plan_moe",
           "run_moe"]

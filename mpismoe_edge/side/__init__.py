"""The ladder side network and its interactive side mixture-of-experts (ISMoE)."""

from .ladder import LadderSideNetwork
from .moe import ISMoE
from .router import InteractiveRouter

__all__ = ["ISMoE", "InteractiveRouter", "LadderSideNetwork"]

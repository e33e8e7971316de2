"""Model rewrites with a register / remove pair (see ``base``)."""

from lens_palrp.canonizers.attention_rebuild import RebuildAttention
from lens_palrp.canonizers.base import Canonizer, ForwardSwap, canonized
from lens_palrp.canonizers.checkpoint_blocks import CheckpointBlocks
from lens_palrp.canonizers.fused_attention import ATTENTION_MODES, FusedAttention, fused_attention_refusal
from lens_palrp.canonizers.grouped_query import UngroupKeyValueHeads
from lens_palrp.canonizers.logit_positions import LogitsAtPositions

__all__ = ["Canonizer", "ForwardSwap", "canonized", "RebuildAttention", "UngroupKeyValueHeads", "FusedAttention",
           "CheckpointBlocks", "LogitsAtPositions", "ATTENTION_MODES", "fused_attention_refusal"]

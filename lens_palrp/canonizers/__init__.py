"""Model rewrites with a register / remove pair (see ``base``)."""

from lens_palrp.canonizers.attention_rebuild import RebuildAttention
from lens_palrp.canonizers.base import Canonizer, canonized
from lens_palrp.canonizers.grouped_query import UngroupKeyValueHeads

__all__ = ["Canonizer", "canonized", "RebuildAttention", "UngroupKeyValueHeads"]

"""Positional-encoding strategies, one module each, registered by the family's ``pe_type``."""

from lens_palrp.positional.base import ENCODINGS, PositionalEncoding, encoding_for, register_encoding
from lens_palrp.positional import alibi, input_table, relative_bias, rope, shortformer  # noqa: F401  (registration)

__all__ = ["ENCODINGS", "PositionalEncoding", "encoding_for", "register_encoding"]

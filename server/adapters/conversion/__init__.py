"""Adapters (of any kind), merges of adapters and full fine-tunes turned into servable LoRAs by truncated
SVD, with their Eckart–Young errors reported (docs/conversion.md)."""

from .budget import Target
from .combine import Combination
from .errors import ConversionRefused
from .jobs import ConversionResult, Converter
from .spectrum import SvdConfig

__all__ = ["Combination", "ConversionRefused", "ConversionResult", "Converter", "SvdConfig", "Target"]

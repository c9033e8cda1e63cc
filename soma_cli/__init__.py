"""SOMA: sub-pixel SAR <-> optical co-registration."""

__version__ = "0.12.0"

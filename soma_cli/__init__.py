"""SOMA: sub-pixel SAR <-> optical co-registration."""

__version__ = "0.11.0"

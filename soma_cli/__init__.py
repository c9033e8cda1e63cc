"""SOMA: sub-pixel SAR <-> optical co-registration."""

__version__ = "0.10.0"

"""Torch side of SOMA: the network, the TorchScript loader and export (no rasterio)."""

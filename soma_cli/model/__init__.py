"""Torch side of SOMA: the network, its preprocessing and the TorchScript loader (no rasterio)."""

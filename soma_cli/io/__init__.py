"""Raster input/output (rasterio only)."""

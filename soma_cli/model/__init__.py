"""Torch side of SOMA (no rasterio): the network (:mod:`.net`, built from :mod:`.config`), training
checkpoints (:mod:`.checkpoint`), the TorchScript export (:mod:`.export`) and loader (:mod:`.loader`)."""

"""``--method soma``: the trained SOMA network (TorchScript weights) as a matcher."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from .. import cpu, infer
from ..model.loader import load_weights


class SomaMatcher:
    """Matcher contract of :mod:`soma_cli.matchers` backed by the shipped (or given) weights."""

    name = "soma"
    # the certainty is calibrated (the probability of being within 1 px), so a pixel more than 5 px
    # off the scene prior is only kept when it is 90 % sure
    trust_certainty = 0.9
    # evidence from 0.7: on T11SMT 95 % of such pixels were within 1 px, and unrelated content,
    # which gets 0.4-0.6 almost everywhere, reached it on at most 7 % (soma_cli.verdict)
    evidence_certainty = 0.7
    # below 128 px the global search has nothing to go on: on 64 px crops of good pairs the
    # certainty was 0 everywhere and the flow off by 15 px, at 96 px the edge similarity fell
    min_size = 128

    def __init__(self, weights: Optional[Path] = None, device: str = "auto", batch_size: int = 4,
                 threads: Optional[int] = None):
        #: degrees: the scene's rotation, the one the global stage searches (None: all of its
        #: hypotheses); set for a registration by :func:`soma_cli.matchers.searching_rotation`
        self.rotation: Optional[float] = None
        self.device = infer.resolve_device(device or "auto")
        if self.device.type == "cpu":
            cpu.tune_allocator()
        self.model, self.metadata = load_weights(weights, device=str(self.device))
        self.batch_size = batch_size
        self.multiple = int(self.metadata["tile_multiple"])
        self.cpu = cpu.CpuShare(threads)
        #: tiles matched at once (:func:`soma_cli.matchers.sharing_cores`), sharing the threads
        self.lanes = 1
        self._lock = threading.Lock()
        if self.cpu.pinned:
            infer.set_threads(self.cpu.pinned)

    def concurrency(self) -> int:
        """How many tiles to match at once (:func:`soma_cli.matchers.sharing_cores`): two on the
        CPU where the matcher may use two threads or more (see :mod:`soma_cli.cpu`), else one (a
        GPU takes batches instead)."""
        if self.device.type != "cpu":
            return 1
        return min(2, self.cpu.pinned or self.cpu.cores)

    def _threads(self) -> None:
        """Torch's threads for the next call: this matcher's share of the CPU, divided between the
        tiles matched at once (the count is process-wide: the latest call's holds for all)."""
        if self.device.type != "cpu":
            return
        with self._lock:
            n = self.cpu.threads()
        infer.set_threads(max(1, n // self.lanes))

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        self._threads()
        return infer.run_model(self.model, opt, sar, opt_valid, sar_valid, batch_size=self.batch_size,
                               device=self.device, multiple=self.multiple, rotation=self.rotation)

    def seed_rotations(self, opt, sar, opt_valid=None, sar_valid=None):
        """``(B,)`` degrees: the rotation the global stage picks on each tile, searching them all."""
        self._threads()
        return infer.global_rotations(self.model, opt, sar, opt_valid, sar_valid, batch_size=self.batch_size,
                                      device=self.device, multiple=self.multiple)

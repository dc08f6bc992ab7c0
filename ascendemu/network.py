"""The network between dies: the on-package link, the Unified Bus (UB) and the RDMA plane.

Model (cloudmatrix-design.md §1 and the spec's sourced assumptions):
- Dies 2k and 2k+1 share a package and talk over the on-package link (one SharedLink per
  direction per package).
- Every other pair talks over UB: a non-blocking switch, so the only shared resources are
  each die's UB injection (tx) and ejection (rx) ports. Crossing a node (16 dies) adds
  `ub_inter_node_extra_latency_cycles` and scales the bandwidth by
  `ub_inter_node_bandwidth_factor`.
- RDMA is a separate, slower plane with its own ports per die.
A message occupies its sender's and receiver's ports (bandwidth.py's sharing rule) and
arrives a fixed latency after its last byte leaves.
"""
from __future__ import annotations

from .bandwidth import SharedLink


class Network:
    def __init__(self, spec, n_dies: int):
        self.spec, self.n = spec, n_dies
        w = spec.bandwidth_window_cycles
        self.ub_tx = [SharedLink(f"die {d} UB tx", spec.ub_port_bytes_per_cycle, w) for d in range(n_dies)]
        self.ub_rx = [SharedLink(f"die {d} UB rx", spec.ub_port_bytes_per_cycle, w) for d in range(n_dies)]
        self.rdma_tx = [SharedLink(f"die {d} RDMA tx", spec.rdma_port_bytes_per_cycle, w) for d in range(n_dies)]
        self.rdma_rx = [SharedLink(f"die {d} RDMA rx", spec.rdma_port_bytes_per_cycle, w) for d in range(n_dies)]
        self.sdma = [SharedLink(f"die {d} SDMA", spec.sdma_bytes_per_cycle, w) for d in range(n_dies)]
        self.pkg = {}  # (src, dst) → SharedLink, made on first use
        self._routes = {}  # (src, dst, plane) → route()

    def package_of(self, d: int) -> int:
        return d // self.spec.dies_per_package

    def node_of(self, d: int) -> int:
        return d // self.spec.dies_per_node

    def route(self, src: int, dst: int, plane: str = "ub"):
        """(links, latency cycles, bandwidth factor) of a message from die `src` to die `dst` (worked out once per
        pair: every remote write asks)."""
        key = (src, dst, plane)
        got = self._routes.get(key)
        if got is None:
            got = self._routes[key] = self._route(src, dst, plane)
        return got

    def _route(self, src: int, dst: int, plane: str):
        s = self.spec
        if plane == "rdma":
            return [self.rdma_tx[src], self.rdma_rx[dst]], s.rdma_latency_cycles, 1.0
        if plane != "ub":
            raise ValueError(f"network plane {plane!r}: use 'ub' or 'rdma'")
        if src == dst:
            return [], 0, 1.0
        if self.package_of(src) == self.package_of(dst):
            key = (src, dst)
            if key not in self.pkg:
                self.pkg[key] = SharedLink(f"package {self.package_of(src)} link {src}→{dst}",
                                           s.package_link_bytes_per_cycle, s.bandwidth_window_cycles)
            return [self.pkg[key]], s.package_link_latency_cycles, 1.0
        if self.node_of(src) == self.node_of(dst):
            return [self.ub_tx[src], self.ub_rx[dst]], s.ub_latency_cycles, 1.0
        return ([self.ub_tx[src], self.ub_rx[dst]], s.ub_latency_cycles + s.ub_inter_node_extra_latency_cycles,
                s.ub_inter_node_bandwidth_factor)

    def send(self, src: int, dst: int, start: int, nbytes: int, cap: float, plane: str = "ub"):
        """Place a message; returns (cycle its last byte leaves, cycle it has arrived)."""
        links, latency, factor = self.route(src, dst, plane)
        end = start
        for link in links:
            end = max(end, link.transfer(start, nbytes, cap * factor))
        return end, end + latency

    def link_bytes(self) -> dict:
        """Bytes carried by every link that carried any."""
        out = {}
        for group in (self.ub_tx, self.ub_rx, self.rdma_tx, self.rdma_rx, self.sdma, list(self.pkg.values())):
            for link in group:
                if link.total_bytes:
                    out[link.name] = link.total_bytes
        return out

"""The local OpenAI-compatible simulator: ``SimServer(SimConfig(...))`` in-process, or ``pipeline sim``."""

from pipeline.sim.server import BANNER, SimConfig, SimServer, SimStats, serve_forever, simulator_process

__all__ = ["BANNER", "SimConfig", "SimServer", "SimStats", "serve_forever", "simulator_process"]

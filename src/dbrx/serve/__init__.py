"""Serving: `dbrx.serve.engine` (continuous batching over a per-request slot cache). The HTTP layer (`dbrx serve`,
OpenAI-compatible) is built on it."""

from dbrx.serve.engine import Engine, Output, SamplingParams

__all__ = ["Engine", "Output", "SamplingParams"]

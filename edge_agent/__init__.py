"""The on-device runtime: EdgeAgent (sync and asyncio), link monitor, local fallback.

    from edge_agent import EdgeAgent, AgentConfig

    with EdgeAgent("model.bundle", servers=["tcp://cloud:5555"], cut="auto") as agent:
        result = agent.infer({"input": frame})
        result.outputs, result.where, result.timings

`edge_agent.inputs` turns image files and arrays into a bundle's inputs, and outputs into labels.
"""

from __future__ import annotations

from edge_agent import inputs
from edge_agent.agent import EdgeAgent, InferenceResult, LinkStats, ServerStats, Session, StepResult
from edge_agent.config import FALLBACK_POLICIES, AgentConfig

__all__ = ["EdgeAgent", "AgentConfig", "InferenceResult", "LinkStats", "ServerStats", "Session", "StepResult",
           "FALLBACK_POLICIES", "inputs"]

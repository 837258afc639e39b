"""Engines: one rank's model and optimizer behind one interface for every backend (see ``collie.engine.base``)."""
from collie.engine.base import Engine
from collie.engine.factory import build_engine
from collie.engine.pipeline import PipelineEngine
from collie.engine.updates import ClassicUpdate, FusedUpdate, StepResult

__all__ = ["ClassicUpdate", "Engine", "FusedUpdate", "PipelineEngine", "StepResult", "build_engine"]

"""Evaluation written once against the StatefulLM protocol."""

from msrnn.evaluate.streaming import StreamEvalConfig, StreamEvalResult, evaluate_stream

__all__ = ["StreamEvalConfig", "StreamEvalResult", "evaluate_stream"]

"""The SPO engine: batching, frozen log-prob passes, the stage loop, checkpoints.

The math (margins, implicit rewards, the offset, the losses) lives in `spoctl.losses`; the engine calls it.
"""

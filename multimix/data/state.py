"""The pipeline's shared state: a tiny Ray actor holding each stream's augmentation pass and
the rows skipped as undecodable.

Protocol (see DESIGN §3): before each Ray Data execution of a stream, the Train workers set its
base pass (:meth:`set_pass`, key: the dataset name, e.g. ``unl_cls``); each map task reads it
once when it starts and renders pass ``base + k`` for the ``k``-th pass of the execution
(:mod:`multimix.data.readers`). Map tasks add the rows they could not decode
(:meth:`add_skipped`); :func:`skipped_rows` reads them back.
"""

from __future__ import annotations

__all__ = ["create_state", "current_pass", "skipped_rows"]


def _state_class():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineState:
        def __init__(self):
            self._pass: dict = {}
            self._skipped: dict = {}
            self._examples: dict = {}

        def set_pass(self, stream: str, value: int) -> None:
            self._pass[stream] = int(value)

        def get_pass(self, stream: str) -> int:
            return self._pass.get(stream, 0)

        def add_skipped(self, stream: str, n: int, examples: list) -> None:
            self._skipped[stream] = self._skipped.get(stream, 0) + int(n)
            ex = self._examples.setdefault(stream, [])
            ex.extend(examples[: max(0, 10 - len(ex))])

        def skipped(self) -> dict:
            return {"counts": dict(self._skipped), "examples": dict(self._examples)}

    return PipelineState


def create_state():
    """A small actor (0 CPUs) holding each stream's augmentation pass and the skipped-row counts.

    Pass the handle to :func:`multimix.data.readers.stream_dataset` (through
    :func:`multimix.data.pipeline.build_data`) and to the workers' stream cursors.
    """
    return _state_class().remote()


def current_pass(state, stream: str, default: int = 0) -> int:
    """The augmentation base pass of the execution under way for ``stream`` (``default``
    without a state actor)."""
    if state is None:
        return default
    import ray

    return int(ray.get(state.get_pass.remote(stream)))


def skipped_rows(state) -> dict:
    """``{"counts": {stream: n}, "examples": {stream: [(id, reason), ...]}}`` so far."""
    import ray

    return ray.get(state.skipped.remote())

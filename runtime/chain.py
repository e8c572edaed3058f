"""The split layout of a multi-task export run as one session: the backbone graph once, then each
task's side graph on the hidden states it outputs.

:class:`ChainedSession` offers the part of ``onnxruntime.InferenceSession`` that the
:class:`~.session.Predictor` uses (``get_inputs``, ``get_outputs``, ``get_providers``, ``run``),
so the predictor reads a split export as it reads a merged one; the results are the merged
graph's (the same nodes, run in two steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort


class ChainedSession:
    """``backbone`` (inputs -> hidden states) feeding ``sides`` (output name -> the session that
    computes it from the backbone's inputs and outputs)."""

    def __init__(self, backbone: ort.InferenceSession, sides: Mapping[str, ort.InferenceSession]):
        self.backbone, self.sides = backbone, dict(sides)
        inputs = {i.name for i in backbone.get_inputs()}
        produced = {o.name for o in backbone.get_outputs()}
        for name, side in self.sides.items():
            outs = [o.name for o in side.get_outputs()]
            if name not in outs:
                raise ValueError(f"side graph for {name!r} has outputs {outs}, not {name!r}")
            missing = {i.name for i in side.get_inputs()} - inputs - produced
            if missing:
                raise ValueError(f"side graph for {name!r} needs {sorted(missing)}, which the backbone graph lacks")

    @property
    def output_names(self) -> list[str]:
        return list(self.sides)

    def get_inputs(self):
        return self.backbone.get_inputs()

    def get_outputs(self):
        return [next(o for o in side.get_outputs() if o.name == name) for name, side in self.sides.items()]

    def get_providers(self) -> list[str]:
        return self.backbone.get_providers()

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray], run_options=None) -> list:
        names = list(output_names or self.sides)
        unknown = [n for n in names if n not in self.sides]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; this model has {list(self.sides)}")
        wanted = sorted({i.name for n in names for i in self.sides[n].get_inputs()} - set(feed))
        states = dict(zip(wanted, self.backbone.run(wanted, dict(feed), run_options)))
        results = []
        for name in names:
            side = self.sides[name]
            side_feed = {i.name: feed[i.name] if i.name in feed else states[i.name] for i in side.get_inputs()}
            results.append(side.run([name], side_feed, run_options)[0])
        return results

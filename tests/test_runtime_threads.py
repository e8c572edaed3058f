"""Predictor: one instance serves many threads at once with the results of serial calls."""

from __future__ import annotations

import threading

import numpy as np
from runtime_models import TEXTS


def test_concurrent_calls_give_the_serial_results(predictor):
    batches = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    serial = [predictor.predict_logits(b, batch_size=2) for b in batches]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors = []
    start = threading.Barrier(8)

    def work(tid):
        try:
            start.wait()
            for rep in range(20):
                k = (tid + rep) % len(batches)
                results[(tid, rep)] = (k, predictor.predict_logits(batches[k], batch_size=2))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 160
    for k, logits in results.values():
        np.testing.assert_array_equal(logits, serial[k])

"""How the training benchmarks measure memory: peak RSS of a run, peak live tensors of its steps.

* **peak RSS**: the process's resident set size sampled from /proc every 5 ms (:class:`PeakRSS`);
  a benchmark subtracts :func:`rss` taken just before it builds the model.
* **peak live tensors** (:func:`tensor_peak`): the bytes of the model's own tensors plus the peak
  of net tensor allocations (torch profiler, ``profile_memory``) over a few training steps on the
  longest batches, with a fresh AdamW so that gradients and optimizer state are allocated inside
  the window: weights + gradients + optimizer state + activations, free of allocator effects.
  Run it in a process of its own: the profiler's records would inflate the training run's RSS.
"""

from __future__ import annotations

import os
import threading
import time


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a thread; ``peak`` is the largest value seen since start."""

    def __init__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def peak_live_bytes(prof) -> int:
    """The peak of net CPU tensor allocations (bytes) over a ``torch.profiler`` window with
    ``profile_memory=True``: allocations and frees replayed in time order."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_peak(model, tok, data, task: str, *, batch_size: int, seed: int, steps: int, aux: bool) -> dict:
    """Model tensor bytes and peak live tensor bytes (MB) over ``steps`` training steps on the
    longest batches of ``data``, with a fresh AdamW (its state is allocated inside the window);
    ``aux``: add the model's MoE balance losses, as its training does."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.peer_training import batch
    from mpismoe_edge.inference import token_lengths
    from mpismoe_edge.loop import batch_order, train_epoch
    from mpismoe_edge.train import TrainConfig, make_optimizer

    lengths = token_lengths(tok, data.texts)
    batches = sorted(batch_order(lengths, batch_size, seed), key=lambda b: -max(lengths[j] for j in b))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = make_optimizer(params, TrainConfig(lr=1e-4), steps=steps)  # the optimizer training builds
    model.train()
    window = (batch(tok, data, idx, task, model.input_names) for idx in batches[:steps])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_epoch(
            lambda inputs: model(**inputs),
            window,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            params,
            task,
            aux_loss=model.aux_loss if aux else None,
            grad_clip=None,
            progress=False,
        )
    model_bytes = sum(storages.values())
    return {"model_tensors_mb": model_bytes / 2**20, "tensor_peak_mb": (model_bytes + peak_live_bytes(prof)) / 2**20}

"""Execution providers: CPU always, CUDA where usable, and a fallback that says what happened."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from runtime_models import TEXTS

from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.session import ProviderFallbackWarning

SESSION_PROVIDER = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}


def test_cpu_is_what_the_session_runs_on(predictor):
    assert predictor.provider == "cpu" and predictor.session.get_providers() == ["CPUExecutionProvider"]


def test_auto_reports_the_provider_the_session_really_uses_and_warns_nothing(model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = Predictor.from_dir(model_dir, provider="auto")
    assert p.provider == SESSION_PROVIDER[p.session.get_providers()[0]]


def test_cuda_falls_back_to_cpu_with_a_warning_where_it_is_not_usable(model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = Predictor.from_dir(model_dir, provider="cuda")
    if p.provider == "cuda":
        pytest.skip("CUDA is usable here: nothing falls back")
    assert p.session.get_providers()[0] == "CPUExecutionProvider"
    assert [w.category for w in caught if issubclass(w.category, ProviderFallbackWarning)] == [ProviderFallbackWarning]


def test_cuda_gives_the_cpu_logits_where_it_is_usable(model_dir, predictor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        p = Predictor.from_dir(model_dir, provider="cuda")
    if p.provider != "cuda":
        pytest.skip("CUDA is not usable here (no GPU, or no working CUDA onnxruntime)")
    assert p.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(p.predict_logits(TEXTS), predictor.predict_logits(TEXTS), atol=1e-4)

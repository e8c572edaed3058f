"""The edge predictor: an exported directory -> labels and probabilities (per text, or per word
for token classification).

Imports only numpy, onnxruntime and tokenizers. One :class:`Predictor` may be used from many
threads at once: ONNX Runtime's ``InferenceSession.run`` is thread safe, and the tokenizer is
configured once at load and never mutated.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding

from .chain import ChainedSession
from .checks import positive_int
from .manifest import ExportFileError, Manifest, TaskHead, check_inside, find_model, load_manifest, require_file
from .spec import DEFAULT_BATCH_SIZE, PROVIDERS, TEXT_INPUTS, TOKENIZER_FILE
from .tasks import kind
from .text import TextEncoder, check_texts, was_truncated

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GRAPH_OPTIMIZATION = {  # by the names of spec.GRAPH_OPTIMIZATIONS
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(bool)": np.dtype(np.bool_),
}


class TruncationWarning(UserWarning):
    """Some texts were longer than the model's max_length and were cut."""


class ProviderFallbackWarning(UserWarning):
    """CUDA was asked for but is not usable; running on CPU."""


def _session_options(threads: int | None, graph_optimization: str, quiet: bool) -> ort.SessionOptions:
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise ValueError(f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, got {graph_optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    if positive_int("threads", threads, optional=True) is not None:
        so.intra_op_num_threads = threads
    if quiet:
        so.log_severity_level = 4
    return so


def _load(model_path: Path, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as e:  # ORT raises its own Exception subclasses (Fail, InvalidGraph, ...)
        m = re.search(r'External data path does not exist: "?([^"\n]+)"?', str(e))
        if m:
            missing = Path(m.group(1))
            raise FileNotFoundError(f"{missing.name} not found (external data of {model_path})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (a truncated or corrupt file?)" if "INVALID_PROTOBUF" in first else ""
        raise ExportFileError(f"{model_path}: ONNX Runtime cannot load it{hint}: {first}") from None


def create_session(
    model_path: str | Path, provider: str = "cpu", threads: int | None = None, graph_optimization: str = "all"
) -> tuple[ort.InferenceSession, str]:
    """Create an ORT session; returns it and the provider really used ("cpu" or "cuda").

    ``provider="cuda"`` falls back to CPU with a :class:`ProviderFallbackWarning` when CUDA is
    not usable; ``"auto"`` falls back silently. onnxruntime-gpu lists CUDAExecutionProvider as
    available even without a GPU, so the session's own provider list is what decides.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    model_path = require_file(Path(model_path))
    if provider == "cpu":
        return _load(model_path, _session_options(threads, graph_optimization, False), [CPU]), "cpu"

    reason = None
    if CUDA not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDAExecutionProvider"
    else:
        quiet = provider == "auto"
        if quiet:  # keep ORT from printing library-load errors for an expected fallback
            ort.set_default_logger_severity(4)
        try:
            sess = _load(model_path, _session_options(threads, graph_optimization, quiet), [CUDA, CPU])
        except FileNotFoundError:
            raise
        except ExportFileError as e:  # a broken file fails again on the CPU below, naming itself
            sess, reason = None, f"creating a CUDA session failed ({e})"
        finally:
            if quiet:
                ort.set_default_logger_severity(2)
        if sess is not None:
            if sess.get_providers()[0] == CUDA:
                return sess, "cuda"
            reason = "CUDA is not usable here (no GPU, or CUDA/cuDNN libraries missing)"
    if provider == "cuda":
        warnings.warn(f"{reason}; running on CPU", ProviderFallbackWarning, stacklevel=3)
    return _load(model_path, _session_options(threads, graph_optimization, False), [CPU]), "cpu"


def _dim_str(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


class Predictor:
    """Run an exported mpismoe-edge model on text.

    >>> p = Predictor.from_dir("out/")
    >>> p.predict(["great phone", "awful battery"])
    [{'label': 'positive', 'probabilities': {...}, 'truncated': False}, ...]

    A multi-task export (several tasks on one backbone pass) gives each text one result per task:
    ``{"sentiment": {"label": ...}, "ner": {"words": [...]}, "truncated": False}``.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        encoder: TextEncoder,
        manifest: Manifest,
        provider: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        tasks: Sequence[str] | None = None,
    ):
        positive_int("batch_size", batch_size)
        self.heads: tuple[TaskHead, ...] = select_tasks(manifest, tasks)
        self.session, self.encoder, self.manifest = session, encoder, manifest
        self.provider, self.batch_size = provider, batch_size
        self._inputs: dict[str, tuple[np.dtype | None, list]] = {
            i.name: (_ORT_DTYPES.get(i.type), list(i.shape)) for i in session.get_inputs()
        }
        unknown = [n for n in self._inputs if n not in TEXT_INPUTS]
        if unknown:
            raise ValueError(
                f"model inputs {unknown} cannot be built from text; "
                f"expected a subset of {list(TEXT_INPUTS)} (use run_arrays for raw feeds)"
            )
        outs = [o.name for o in session.get_outputs()]
        self._outputs = [h.output for h in self.heads] or [manifest.outputs[0]]
        self.output_name = self._outputs[0]
        for name in self._outputs:
            if name not in outs:
                raise ValueError(f"manifest output {name!r} is not a model output; model has {outs}")

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        graph_optimization: str = "all",
        batch_size: int = DEFAULT_BATCH_SIZE,
        tasks: Sequence[str] | None = None,
    ) -> Predictor:
        """``tasks``: of a multi-task export, the tasks to run (default: all); a split export
        loads only their side graphs."""
        path = Path(path)
        manifest = load_manifest(path)
        heads = select_tasks(manifest, tasks)
        tok_path = require_file(path / TOKENIZER_FILE, path)
        session: ort.InferenceSession | ChainedSession
        if manifest.layout == "split":
            session, used = _chained(path, manifest, heads, provider, threads, graph_optimization)
        else:
            session, used = create_session(find_model(path), provider, threads, graph_optimization)
        if manifest.target == "ort-cuda" and used != "cuda":
            warnings.warn(
                "model was exported for target 'ort-cuda' but runs on CPU", ProviderFallbackWarning, stacklevel=2
            )
        return cls(session, TextEncoder(tok_path, manifest.max_length), manifest, used, batch_size, tasks)

    # ---- properties -------------------------------------------------------------------------
    @property
    def labels(self) -> list[str] | None:
        return list(self.manifest.labels) if self.manifest.labels else None

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    @property
    def tasks(self) -> list[str]:
        """The names of the tasks this predictor runs (a multi-task export); [] for one task."""
        return [h.name for h in self.heads]

    def input_spec(self) -> dict[str, tuple[str, str]]:
        """{name: (dtype, shape)} of the model's inputs, for messages and docs."""
        return {n: (str(dt), _dim_str(shape)) for n, (dt, shape) in self._inputs.items()}

    def __repr__(self) -> str:
        return (
            f"Predictor(task={self.task!r}, labels={self.labels}, max_length={self.max_length}, "
            f"provider={self.provider!r})"
        )

    # ---- raw arrays -------------------------------------------------------------------------
    def _expected(self) -> str:
        return "; ".join(f"{n}: {dt} {shape}" for n, (dt, shape) in self.input_spec().items())

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        """Raise ValueError/TypeError if ``feed`` does not match the model's inputs."""
        if not isinstance(feed, Mapping):
            raise TypeError(f"feed must be a dict of numpy arrays; expected {self._expected()}")
        missing = [n for n in self._inputs if n not in feed]
        extra = [n for n in feed if n not in self._inputs]
        if missing or extra:
            raise ValueError(f"wrong input names (missing {missing}, unexpected {extra}); expected {self._expected()}")
        dims: dict[str, tuple[int, str]] = {}
        for name, (dtype, shape) in self._inputs.items():
            arr = feed[name]
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}; expected {self._expected()}")
            if arr.dtype != dtype:
                raise ValueError(f"{name} has dtype {arr.dtype}, expected {dtype}; expected {self._expected()}")
            if arr.ndim != len(shape):
                raise ValueError(
                    f"{name} has shape {list(arr.shape)} (rank {arr.ndim}), expected "
                    f"rank {len(shape)}; expected {self._expected()}"
                )
            for axis, (want, got) in enumerate(zip(shape, arr.shape)):
                if got == 0:
                    raise ValueError(f"{name} has an empty axis {axis} (shape {list(arr.shape)}): empty batch")
                if isinstance(want, int) and want != got:
                    raise ValueError(f"{name} axis {axis} is {got}, model requires {want}; expected {self._expected()}")
                if isinstance(want, str):
                    if want in dims and dims[want][0] != got:
                        other = dims[want][1]
                        raise ValueError(
                            f"{name} axis {axis} is {got} but {other} has {dims[want][0]} "
                            f"for the same dimension '{want}'"
                        )
                    dims.setdefault(want, (got, name))
            if arr.dtype.kind == "f" and np.isnan(arr).any():
                raise ValueError(f"{name} contains NaN")
            if name == "input_ids":
                vocab = self.encoder.vocab_size
                if arr.min() < 0 or arr.max() >= vocab:
                    raise ValueError(f"input_ids must lie in [0, {vocab}), got range [{arr.min()}, {arr.max()}]")

    def run_arrays(self, feed: Mapping[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        """Run the model on a feed you built yourself; returns the logits (float32); of a
        multi-task export, ``{task: logits}``."""
        self.check_feed(feed)
        outs = self._run_all(dict(feed))
        return dict(zip(self.tasks, outs)) if self.heads else outs[0]

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self._run_all(feed)[0]

    def _run_all(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(out, dtype=np.float32) for out in self.session.run(self._outputs, feed)]

    # ---- text -------------------------------------------------------------------------------
    def _batch_size(self, batch_size: int | None) -> int:
        return self.batch_size if batch_size is None else positive_int("batch_size", batch_size)

    def _kinds(self) -> list[str]:
        return [h.task for h in self.heads] or [self.task]

    def _logits_and_encodings(
        self, texts, batch_size: int | None
    ) -> tuple[np.ndarray | list[np.ndarray], list[Encoding]]:
        every, encs = self._all_logits_and_encodings(texts, batch_size)
        return every[0], encs

    def _all_logits_and_encodings(
        self, texts, batch_size: int | None
    ) -> tuple[list[np.ndarray | list[np.ndarray]], list[Encoding]]:
        """Each output's logits (one per task; one for a single-task export) and the encodings."""
        texts = check_texts(texts)
        bs = self._batch_size(batch_size)
        encs = self.encoder.tokenize(texts)
        # Group texts of similar length to pad less; results go back in input order.
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        chunks = []
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            arrays = self.encoder.pad([encs[i] for i in idx]).arrays()
            feed = {n: arrays[n].astype(dt, copy=False) for n, (dt, _) in self._inputs.items()}
            chunks.append((idx, self._run_all(feed)))
        every: list[np.ndarray | list[np.ndarray]] = []
        for j, task in enumerate(self._kinds()):
            outs = [(idx, out[j]) for idx, out in chunks]
            logits: np.ndarray | list[np.ndarray]
            if kind(task).token_level:
                logits = self._per_text(outs, encs)
            else:
                first = outs[0][1]
                logits = np.empty((len(texts),) + first.shape[1:], dtype=np.float32)
                for idx, out in outs:
                    logits[idx] = out
            every.append(logits)
        n_cut = sum(was_truncated(e) for e in encs)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(texts)} text(s) exceeded max_length={self.max_length} tokens and were truncated",
                TruncationWarning,
                stacklevel=3,
            )
        return every, encs

    @staticmethod
    def _per_text(chunks: list[tuple[list[int], np.ndarray]], encs: list[Encoding]) -> list[np.ndarray]:
        """Per-token logits of padded chunks -> one ``[tokens, labels]`` array per text (chunks
        differ in sequence length, so they cannot share one array)."""
        rows: list[np.ndarray] = [np.empty(0, np.float32)] * len(encs)
        for idx, out in chunks:
            seq = max(1, max(len(encs[i].ids) for i in idx))  # as TextEncoder.pad
            if out.ndim != 3 or out.shape[:2] != (len(idx), seq):
                raise ValueError(
                    f"a token-classification model must return logits [batch, seq, labels] "
                    f"([{len(idx)}, {seq}, labels] here), got {list(out.shape)}"
                )
            for i, row in zip(idx, out):
                rows[i] = row[: len(encs[i].ids)].copy()
        return rows

    def predict_logits(self, texts: Sequence[str], batch_size: int | None = None):
        """Logits in input order (float32).

        classification, regression: one array ``[len(texts), num_outputs]``.
        token-classification: a list with one array ``[tokens_i, num_labels]`` per text: the
        logits of its real tokens (special tokens included, no padding), in tokenizer order.
        A multi-task export: ``{task: those logits}``.
        """
        every, _ = self._all_logits_and_encodings(texts, batch_size)
        return dict(zip(self.tasks, every)) if self.heads else every[0]

    def predict(self, texts: Sequence[str], batch_size: int | None = None) -> list[dict]:
        """One dict per text.

        classification: {"label", "probabilities": {label: p}, "truncated"}
        regression:     {"score", "truncated"} (score is a list when the model has several outputs)
        multi-label-classification: {"labels" (those above their threshold), "probabilities", "truncated"}
        token-classification: {"words": [{"word", "start", "end", "label", "score"}, ...],
            "truncated"}, one entry per word as the tokenizer's pre-tokenizer splits the text, labelled by its
            first sub-word token (``score``: that label's probability there); ``start``/``end``
            are character offsets into the text and ``word == text[start:end]``. Words wholly cut
            off by truncation are absent; one cut in the middle keeps its full span.
        """
        texts = check_texts(texts)
        every, encs = self._all_logits_and_encodings(texts, batch_size)
        answers = [
            self._read(task, logits, texts, encs, h.labels if h else self.manifest.labels)
            for task, logits, h in zip(self._kinds(), every, self.heads or (None,))
        ]
        if not self.heads:
            return [{**a, "truncated": was_truncated(e)} for a, e in zip(answers[0], encs)]
        return [
            {**{h.name: answers[j][i] for j, h in enumerate(self.heads)}, "truncated": was_truncated(enc)}
            for i, enc in enumerate(encs)
        ]

    def _read(self, task_name: str, logits, texts, encs, names) -> list[dict]:
        task = kind(task_name)  # how a row of logits is read (runtime/tasks.py)
        rows = logits if isinstance(logits, list) or logits.ndim > 1 else logits[:, None]
        labels = self._label_names(rows[0].shape[-1], names) if task.has_labels else []
        return [task.read(row, labels, text, enc) for text, enc, row in zip(texts, encs, rows)]

    def _label_names(self, n: int, names=None) -> list[str]:
        labels = list(names) if names else [str(i) for i in range(n)]
        if len(labels) != n:
            raise ValueError(f"model returns {n} logits but the manifest lists {len(labels)} labels")
        return labels


def select_tasks(manifest: Manifest, tasks: Sequence[str] | None) -> tuple[TaskHead, ...]:
    """The heads of ``manifest`` named by ``tasks`` (all when None); ValueError naming an unknown
    one, or ``tasks`` for a single-task export."""
    if tasks is None:
        return manifest.tasks
    if isinstance(tasks, str):
        raise TypeError("tasks must be a list of task names, not a str")
    if not manifest.tasks:
        raise ValueError(f"tasks {list(tasks)} given, but this is a single-task export ({manifest.task})")
    by_name = {h.name: h for h in manifest.tasks}
    unknown = [t for t in tasks if t not in by_name]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or list(tasks)}; this export has {list(by_name)}")
    return tuple(by_name[t] for t in dict.fromkeys(tasks))


def _chained(
    path: Path, manifest: Manifest, heads: tuple[TaskHead, ...], provider: str, threads, graph_optimization: str
) -> tuple[ChainedSession, str]:
    """The split layout's sessions: the backbone's, and the side graphs of ``heads`` only."""
    backbone_path = check_inside(require_file(path / str(manifest.backbone_model), path), path)
    backbone, used = create_session(backbone_path, provider, threads, graph_optimization)
    sides = {}
    for head in heads or manifest.tasks:
        side_path = check_inside(require_file(path / str(head.model), path), path)
        sides[head.output] = create_session(side_path, used, threads, graph_optimization)[0]
    try:
        return ChainedSession(backbone, sides), used
    except ValueError as e:
        raise ExportFileError(f"{path}: {e}") from None

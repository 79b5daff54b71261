"""The fixed-layout records ranks exchange besides models, declared once.

Each is a numpy structured dtype of float64 fields, so it travels as a plain float64 buffer through
the wire (no pickling) and is read back by field name. Text (error messages, host names) travels in
fixed-width uint8 rows, read back with its control and format characters and line separators escaped (ESCAPED).
"""

from __future__ import annotations

import unicodedata

import numpy as np

# A learner's end-of-round report: mean train loss, samples, seconds of local training, bytes it is
# about to hand to MPI for its model (and, in PruneFL's reconfiguration rounds, its squared gradients),
# whether all of them are finite, and the seconds it spent besides training: from the model's arrival to
# training (set-up), from training to this report (encoding).
REPORT = np.dtype(
    [
        (name, np.float64)
        for name in ("loss", "samples", "seconds_train", "payload_nbytes", "finite", "seconds_setup", "seconds_encode")
    ]
)

# What each rank found in its preflight: its data file's sample count, mean age and volume shape.
PREFLIGHT = np.dtype([(name, np.float64) for name in ("samples", "mean_age", "x", "y", "z")])

# A rank's start-up (fedmpi.startup), seconds a phase: from the process's start to MPI_Init (the interpreter, the
# imports, the sentinel, the configuration), MPI_Init (which waits for every rank), the data directory (the
# rank table, the agreement, the synthetic cohort), the preflight (the device: CUDA's context), decoding its volumes
# into the cache, building the model (the server: its recorder and resume point too), and the warm-up step (cuDNN's
# benchmark search).
STARTUP = np.dtype(
    [(name, np.float64) for name in ("imports", "mpi", "prepare", "preflight", "volumes", "model", "warm_up")]
)

# The unicode categories row_text escapes in another rank's text: controls (Cc), format characters (Cf), and the
# line and paragraph separators (Zl, Zp: U+2028, U+2029), which some terminals and log viewers break lines at.
ESCAPED = ("Cc", "Cf", "Zl", "Zp")


def _names(dtype: np.dtype) -> tuple[str, ...]:
    if dtype.names is None:
        raise TypeError(f"{dtype} is not a record dtype")
    return dtype.names


def width(dtype: np.dtype) -> int:
    """How many float64 values one record of `dtype` takes on the wire."""
    return len(_names(dtype))


def record(dtype: np.dtype, **values: float) -> np.ndarray:
    """One record of `dtype` as the float64 buffer the wire carries; every field must be given."""
    names = _names(dtype)
    if set(names) != set(values):
        raise ValueError(f"record needs exactly the fields {names}, got {sorted(values)}")
    rec = np.zeros(1, dtype)
    for name, value in values.items():
        rec[name] = value
    return rec.view(np.float64)


def records(buffer: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows of float64 (K, fields) as K records readable by field name."""
    return np.ascontiguousarray(buffer, dtype=np.float64).reshape(-1, len(_names(dtype))).view(dtype).reshape(-1)


def fields_of(rec: np.ndarray | np.void, dtype: np.dtype) -> dict[str, float]:
    """One record of `dtype` (an element of records(), or its float64 values) as {field: value}, to check and to
    name its values."""
    return dict(zip(_names(dtype), (float(v) for v in np.asarray(rec).tolist())))


def shown(values: dict[str, float]) -> str:
    """A record's fields as a refusal quotes them: 'samples 10.0, mean_age 62.5, ...'."""
    return ", ".join(f"{name} {v}" for name, v in values.items())


VALUE_CHARS = 40  # the most of another rank's value a line shows: its ends (a path's root and its leaf)


def brief(value: object) -> str:
    """A value's repr, its middle left out beyond VALUE_CHARS: lines naming another rank's settings stay short."""
    text = repr(value)
    if len(text) <= VALUE_CHARS:
        return text
    half = (VALUE_CHARS - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def text_row(text: str, width: int) -> np.ndarray:
    """Text in a fixed-width uint8 buffer (cut to fit, zero-padded), for fixed-size gathers."""
    row = np.zeros(width, np.uint8)
    raw = text.encode()[:width]
    row[: len(raw)] = np.frombuffer(raw, np.uint8)
    return row


def row_text(row: np.ndarray) -> str:
    """The text a text_row holds: the zero padding dropped, a character the cut split replaced, and the ESCAPED
    characters escaped (ESC as the four characters \\x1b, a right-to-left override as \\u202e): another rank's host
    name or message is printed, and must not drive this terminal (clear it, retitle it, rewrite the lines above),
    start a line of its own (U+2028, U+2029) nor display reversed or hide text (bidirectional overrides,
    zero-width characters)."""
    text = bytes(row).rstrip(b"\0").decode(errors="replace")
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ESCAPED else c for c in text)

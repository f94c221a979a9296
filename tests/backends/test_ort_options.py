"""ONNX Runtime session options: the three spinning modes set the config entries ORT reads."""

from __future__ import annotations

import pytest

from deploykit.backends.ort import DEFAULT_SPINNING, SPINNING, session_options
from deploykit.errors import BackendError


@pytest.mark.parametrize(("mode", "spin", "stop"), [("off", "0", None), ("in-run", "1", "1"), ("on", "1", None),
                                                    (False, "0", None), (True, "1", None)])
def test_spinning_modes(mode: object, spin: str, stop: str | None) -> None:
    so = session_options(threads=2, spinning=mode)  # type: ignore[arg-type]
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == spin
    if stop is None:
        with pytest.raises(Exception):  # noqa: B017  (ORT raises its own error for an unset key)
            so.get_session_config_entry("session.force_spinning_stop")
    else:
        assert so.get_session_config_entry("session.force_spinning_stop") == stop


def test_default_and_bad_mode() -> None:
    assert DEFAULT_SPINNING in SPINNING
    with pytest.raises(BackendError, match="spinning must be one of off, in-run, on"):
        session_options(spinning="sometimes")

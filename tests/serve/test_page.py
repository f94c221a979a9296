"""The page at / in headless Chromium: an image goes in through the page's own upload path, the result shows."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from serve_helpers import http, png_bytes


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("DEPLOYKIT_TEST_APT") == "1" and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=900)
        if path := shutil.which("chromium"):
            return path
    pytest.skip("headless Chromium not found; install Debian's `chromium` package (or set DEPLOYKIT_TEST_APT=1 "
                "to let this test apt-get it as root)")


def _run(chrome: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=8000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_page_shows_label_confidence_and_exit_stage(server, tmp_path):
    chrome = _chromium()
    code, _, html = http(server.url + "/")
    assert code == 200 and b"Drop an image" in html
    url = f"{server.url}/#image={quote(base64.b64encode(png_bytes(3)).decode())}"
    dom = _run(chrome, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-done="1"' in dom.stdout, dom.stdout[-3000:]
    assert 'id="label">class_' in dom.stdout
    assert "(of 0..3)" in dom.stdout and " %</span>" in dom.stdout
    assert 'class="lbl">stage 3<' in dom.stdout  # the live exits-per-stage view rendered
    shot = Path(os.environ.get("DEPLOYKIT_SCREENSHOT", tmp_path / "page.png"))
    _run(chrome, tmp_path, f"--screenshot={shot}", "--window-size=1100,650", url)
    assert shot.exists() and shot.stat().st_size > 5000


def test_page_answers_with_a_mue_engine(mue_server, mue_inputs, tmp_path):
    """A MuE engine: task choice and text box, the answer text and layers used shown."""
    chrome = _chromium()
    code, _, html = http(mue_server.url + "/")
    assert code == 200 and b'id="task"' in html and b'id="text"' in html
    b64 = quote(base64.b64encode(mue_inputs["files"][0]).decode())
    url = f"{mue_server.url}/#image={b64}&task=entailment&text={quote(mue_inputs['texts'][0])}"
    dom = _run(chrome, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-done="1"' in dom.stdout, dom.stdout[-3000:]
    assert any(f'id="label">{a}<' in dom.stdout for a in ("entailment", "neutral", "contradiction"))
    assert 'id="layers">' in dom.stdout and " %</span>" in dom.stdout

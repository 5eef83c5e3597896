"""Headless Chromium, for the tests that render a report in a browser (Debian's ``chromium``; CI installs it)."""
from __future__ import annotations

import os
import subprocess

import pytest

CHROMIUM = "/usr/bin/chromium"


def run_chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` (a profile under ``tmp_path``); fails the test when it is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: the report's browser test needs Chromium "
                    "(apt-get install chromium; CI installs it)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc

"""CPU fits keep freed heap memory mapped (glibc's trim threshold), unless told not to."""

from __future__ import annotations

import sys

import pytest

import app.host_memory as host_memory
from tests.conftest import fit_tiny, tiny_masked_lm


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_setting_applies_on_linux_and_can_be_turned_off(monkeypatch):
    assert host_memory.keep_freed_host_memory()
    monkeypatch.setenv("NTNG_KEEP_FREED_MEMORY", "0")
    assert not host_memory.keep_freed_host_memory()


def test_a_cpu_fit_applies_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("app.modules.budgeted.keep_freed_host_memory", lambda: calls.append(True))
    fit_tiny(tiny_masked_lm(), [], tmp_path, max_steps=1)
    assert calls == [True]

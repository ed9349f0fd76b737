"""main._preload: what is imported before root is dropped."""

import importlib

from emailrelay import main, options


def _preloaded(monkeypatch, argv):
    seen = []
    monkeypatch.setattr(main, "_switching_user", lambda cfg: True)
    monkeypatch.setattr(importlib, "import_module", lambda name: seen.append(name))
    main._preload(options.parse(["--spool-dir", "/tmp"] + argv))
    return seen


def test_syslog_is_preloaded_whenever_logging_will_open_it(monkeypatch):
    # Warnings and errors go to syslog without --log too.
    assert "syslog" in _preloaded(monkeypatch, [])
    assert "syslog" in _preloaded(monkeypatch, ["--log"])
    assert "syslog" not in _preloaded(monkeypatch, ["--no-syslog"])
    assert "syslog" in _preloaded(monkeypatch, ["--no-syslog", "--syslog"])

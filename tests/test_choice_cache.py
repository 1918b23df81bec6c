"""The shared cache of measured kernel choices (W4A4 dispatch, KV attention)."""

import json

from deepcompressor.kernels.choice_cache import ChoiceCache


def test_choices_persist_across_instances_and_ignore_other_formats(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VAR_COMPRESSOR_CACHE", str(tmp_path))
    cache = ChoiceCache("x.json", "fmt/1", "test", valid=lambda c: isinstance(c, dict) and "backend" in c)
    assert cache.path == tmp_path / "x.json" and cache.get("k") is None
    cache.put("k", {"backend": "a"})
    cache.put("memory-only", {"backend": "b"}, persist=False)
    again = ChoiceCache("x.json", "fmt/1", "test", valid=lambda c: isinstance(c, dict) and "backend" in c)
    assert again.get("k") == {"backend": "a"} and again.get("memory-only") is None
    assert ChoiceCache("x.json", "fmt/2", "test").get("k") is None  # another format: not read
    (tmp_path / "x.json").write_text(json.dumps({"format": "fmt/1", "choices": {"k": {"other": 1}}}))
    assert ChoiceCache("x.json", "fmt/1", "test", valid=lambda c: "backend" in c).get("k") is None
    (tmp_path / "x.json").write_text("{broken")
    assert ChoiceCache("x.json", "fmt/1", "test").get("k") is None
    assert "ignoring unreadable test cache" in caplog.text


def test_an_unwritable_cache_folder_does_not_stop_inference(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VAR_COMPRESSOR_CACHE", str(blocker))  # a file where the folder should be
    cache = ChoiceCache("x.json", "fmt/1", "test")
    cache.put("k", {"backend": "a"})
    assert cache.get("k") == {"backend": "a"} and "could not write the test cache" in caplog.text

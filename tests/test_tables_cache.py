"""Tests of the crash-safe table cache (lightning_layermerge.tables.cache)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from lightning_layermerge.planning.tables import cache as cache_module
from lightning_layermerge.planning.tables.cache import TableCache, TableCacheWarning, fingerprint

KEY = {"arch": "abc123", "device": "cuda:0 NVIDIA H100", "dtype": "float32",
       "batch": [128, 3, 224, 224], "torch": "2.4.0"}


def open_quietly(path: Path, key=KEY) -> TableCache:
    """Open a cache, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return TableCache(path, key)


def test_missing_file_is_empty_and_nothing_is_written(tmp_path: Path) -> None:
    cache = open_quietly(tmp_path / "sub" / "t.json")
    assert len(cache) == 0 and cache.items() == {} and cache.get((0, 1, 3)) is None
    assert not (tmp_path / "sub").exists()  # directory only created on the first put


def test_resume_after_interruption(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "latency.json"
    first = TableCache(path, KEY)
    first.put((0, 1, 3), 0.125)
    first.put((0, 2, 5), 1.0 / 3.0)
    first.put((1, 2, 1), 7)
    del first  # "interrupted": nothing flushed at exit, every put already persisted
    again = open_quietly(path)
    assert again.items() == {(0, 1, 3): 0.125, (0, 2, 5): 1.0 / 3.0, (1, 2, 1): 7.0}
    assert again.get((0, 2, 5)) == 1.0 / 3.0  # exact float round-trip
    assert (0, 1, 3) in again and (2, 3, 3) not in again and "junk" not in again
    again.put((2, 3, 3), 2.5)
    again.put((0, 1, 3), 0.25)  # overwrite
    assert open_quietly(path).items() == {(0, 1, 3): 0.25, (0, 2, 5): 1.0 / 3.0,
                                          (1, 2, 1): 7.0, (2, 3, 3): 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["latency.json"]  # no temp files left


def test_non_finite_values_round_trip_as_standard_json(tmp_path: Path) -> None:
    path = tmp_path / "imp.json"
    cache = TableCache(path, KEY)
    cache.put((0, 1, 3), math.nan)
    cache.put((0, 2, 5), -math.inf)
    cache.put((1, 2, 1), math.inf)
    cache.put((1, 2, 3), -0.0)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON literal {c}"))
    back = open_quietly(path)
    assert math.isnan(back.get((0, 1, 3)))
    assert back.get((0, 2, 5)) == -math.inf and back.get((1, 2, 1)) == math.inf
    assert math.copysign(1.0, back.get((1, 2, 3))) == -1.0


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    TableCache(path, KEY).put((3, 4, 1), 0.5)
    doc = json.loads(path.read_text())
    assert doc["format"] == cache_module.FORMAT_VERSION
    assert doc["key"] == KEY
    assert doc["entries"] == [[3, 4, 1, 0.5]]
    assert len(doc["checksum"]) == 64


_WRITER = """
import importlib.util, sys
# Load the module by path: importing the package __init__ might pull in torch (slow).
spec = importlib.util.spec_from_file_location("cache", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
cache = mod.TableCache(sys.argv[2], {"arch": "x"})
for n in range(1_000_000):
    cache.put((0, n + 1, 3), n * 0.5)
"""


def test_sigkill_while_writing_leaves_a_clean_prefix(tmp_path: Path) -> None:
    path = tmp_path / "killed.json"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, cache_module.__file__, str(path)])
    try:
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:  # wait until a few dozen entries are on disk
            if path.exists() and path.stat().st_size > 1500:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the writer subprocess never wrote its cache file")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    back = open_quietly(path, {"arch": "x"})  # no warning: the file is complete
    n = len(back)
    assert n >= 10
    assert back.items() == {(0, m + 1, 3): m * 0.5 for m in range(n)}  # exactly a prefix
    back.put((5, 6, 1), 1.0)  # and it is writable again
    assert len(open_quietly(path, {"arch": "x"})) == n + 1


def _warns_and_moves(path: Path, suffix: str, reason: str, key=KEY) -> TableCache:
    with pytest.warns(TableCacheWarning, match=reason) as record:
        cache = TableCache(path, key)
    assert str(path) in str(record[0].message)
    assert len(cache) == 0
    assert not path.exists()
    assert path.with_name(path.name + suffix).exists()
    return cache


def test_truncated_file_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    cache = TableCache(path, KEY)
    for n in range(5):
        cache.put((n, n + 1, 3), float(n))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    rebuilt = _warns_and_moves(path, ".corrupt", "not valid JSON")
    rebuilt.put((0, 1, 3), 9.0)
    assert open_quietly(path).items() == {(0, 1, 3): 9.0}


def test_flipped_value_fails_checksum(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    cache = TableCache(path, KEY)
    cache.put((0, 1, 3), 1.25)
    cache.put((1, 2, 3), 2.5)
    doc = json.loads(path.read_text())
    doc["entries"][1][3] = 250.0  # a wrong number must never be trusted
    path.write_text(json.dumps(doc))
    _warns_and_moves(path, ".corrupt", "fails its checksum")


@pytest.mark.parametrize(
    "content,reason",
    [("[1, 2, 3]", "lacks the format"),
     ("", "not valid JSON"),
     (b"\xff\xfe\x00garbage", "cannot be read")],
)
def test_other_corruption(tmp_path: Path, content, reason: str) -> None:
    path = tmp_path / "t.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    _warns_and_moves(path, ".corrupt", reason)


def test_foreign_key_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    TableCache(path, KEY).put((0, 1, 3), 1.0)
    other = {**KEY, "device": "cpu"}
    cache = _warns_and_moves(path, ".stale", r"another key \(device: file 'cuda:0", key=other)
    cache.put((0, 1, 3), 2.0)
    assert open_quietly(path, other).get((0, 1, 3)) == 2.0
    # The stale file is kept intact for inspection.
    assert json.loads(path.with_name("t.json.stale").read_text())["key"] == KEY


def test_other_format_version_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 99, "key": KEY, "checksum": "", "entries": []}))
    _warns_and_moves(path, ".stale", "format version 99")


def test_key_comparison_survives_json_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    TableCache(path, {"batch": (64, 3, 32, 32), "lr": 0.1}).put((0, 1, 1), 1.0)
    assert len(open_quietly(path, {"lr": 0.1, "batch": [64, 3, 32, 32]})) == 1


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        TableCache(tmp_path, KEY)
    with pytest.raises(TypeError, match="key must be a mapping"):
        TableCache(tmp_path / "t.json", ["arch"])
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        TableCache(tmp_path / "t.json", {"device": object()})
    cache = TableCache(tmp_path / "t.json", KEY)
    with pytest.raises(TypeError, match=r"\(i, j, k\) triples of ints"):
        cache.put((0, 1), 1.0)
    with pytest.raises(TypeError, match="must be a number"):
        cache.put((0, 1, 3), "fast")
    assert not (tmp_path / "t.json").exists()


def test_failed_write_leaves_memory_equal_to_disk(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    cache = TableCache(path, KEY)
    cache.put((0, 1, 3), 1.0)
    (tmp_path / "blocker").write_text("")
    cache._path = tmp_path / "blocker" / "t.json"  # parent is a file: mkdir fails
    with pytest.raises(OSError):
        cache.put((1, 2, 3), 2.0)
    assert cache.items() == {(0, 1, 3): 1.0}


def test_fingerprint_is_stable_and_order_independent() -> None:
    a = fingerprint({"b": 1, "a": [1, 2]}, "resnet34", (128, 3))
    b = fingerprint({"a": [1, 2], "b": 1}, "resnet34", [128, 3])
    assert a == b and len(a) == 64
    assert fingerprint("x") != fingerprint("y")
    # Pinned value: the digest must not change between releases, or every cache goes stale.
    assert fingerprint({"a": 1}) == (
        "b713f6d2a989e907c58516a7c8bb487792c8785ddbf367b80dc774bf33b85a85")
    with pytest.raises(ValueError, match="NaN"):
        fingerprint(math.nan)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        fingerprint({1, 2})

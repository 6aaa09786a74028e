"""Crash-safe on-disk cache of lookup-table entries (pure stdlib, no torch).

Measuring a LayerMerge table takes hours (one fine-tune per importance entry), so every
entry is persisted the moment it is known and a restarted run resumes where it stopped.

File format (JSON, one file per table)::

    {"format": 1,
     "key": {...fingerprint fields: architecture hash, device, dtype, batch shape...},
     "checksum": "<sha256 hex over the canonical JSON of format, key and entries>",
     "entries": [[i, j, k, value], ...]}        # sorted by (i, j, k)

Non-finite values are stored as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so the file
stays standard JSON. Every :meth:`TableCache.put` rewrites the whole file into a temporary
file in the same directory and ``os.replace``-s it over the old one, so a kill at any moment
leaves either the old or the new complete file (a stray ``.<name>.*.tmp`` may remain).

On open, a file that cannot be parsed or fails its checksum (*corrupt*), or that was written
for another key or format version (*stale*), is never trusted: a :class:`TableCacheWarning`
names the path and the reason, the file is renamed to ``<name>.corrupt`` / ``<name>.stale``
(replacing an older one of that name) and the cache starts empty.

One writer per file: two processes writing the same file both succeed, but the last writer's
entries win. Give parallel workers separate files and merge their :meth:`TableCache.items`.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_VERSION", "TableCache", "TableCacheWarning", "fingerprint"]

#: Version of the on-disk format; files of another version are treated as stale.
FORMAT_VERSION = 1

Entry = tuple[int, int, int]

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class TableCacheWarning(UserWarning):
    """A cache file was corrupt or stale and has been moved aside."""


class _Reject(Exception):
    """Internal: the file on disk must not be used. ``kind`` is ``"corrupt"`` or ``"stale"``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def fingerprint(*parts: Any) -> str:
    """Stable SHA-256 hex digest of JSON-serialisable ``parts``.

    Dict keys are sorted and whitespace is fixed, so equal values give equal digests across
    processes and Python versions. Tuples hash like lists.

    Args:
        *parts: JSON-serialisable values (str, int, float, bool, None, lists, tuples, dicts
            with str keys). NaN and infinities are rejected.

    Returns:
        64 lowercase hex characters.

    Raises:
        TypeError: If a part is not JSON-serialisable; convert it (e.g. ``str(torch.__version__)``).
        ValueError: If a part contains NaN or an infinity.
    """
    return hashlib.sha256(_canonical(list(parts)).encode("utf-8")).hexdigest()


def _canonical(obj: Any) -> str:
    """Deterministic JSON text of ``obj`` (sorted keys, no spaces, no NaN)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except TypeError as err:
        raise TypeError(f"value is not JSON-serialisable ({err}); convert it to str/int/float "
                        "or a list/dict of those") from None
    except ValueError as err:
        raise ValueError(f"value contains NaN or infinity, which has no stable JSON form: {err}") from None


class TableCache:
    """Persistent mapping ``(i, j, k) -> float`` bound to a fingerprint ``key``.

    Example:
        >>> cache = TableCache("tables/importance.json", {"arch": fingerprint(spec), "seed": 0})
        >>> if (0, 3, 5) not in cache:
        ...     cache.put((0, 3, 5), measure(0, 3, 5))

    Args:
        path: The JSON file. Its directory is created on the first :meth:`put`.
        key: Everything the numbers depend on (architecture hash, device, dtype, batch shape,
            torch version, ...). Must be JSON-serialisable with str keys; a file written with
            a different key is moved aside as stale.

    Raises:
        TypeError: If ``key`` is not a mapping or not JSON-serialisable.
        ValueError: If ``path`` is a directory.
    """

    def __init__(self, path: str | os.PathLike, key: Mapping[str, Any]) -> None:
        if not isinstance(key, Mapping):
            raise TypeError(f"key must be a mapping of fingerprint fields, got {type(key).__name__}")
        self._path = Path(path)
        if self._path.is_dir():
            raise ValueError(f"table cache path {self._path} is a directory; pass a file path")
        # Round-trip through JSON so the in-memory key compares equal to what is read back.
        self._key: dict[str, Any] = json.loads(_canonical(dict(key)))
        self._entries: dict[Entry, float] = self._load()

    # ------------------------------------------------------------------ public API

    @property
    def path(self) -> Path:
        """The cache file."""
        return self._path

    @property
    def key(self) -> dict[str, Any]:
        """A copy of the fingerprint fields (as read back from JSON)."""
        return json.loads(_canonical(self._key))

    def get(self, entry: tuple[int, int, int]) -> float | None:
        """Return the cached value of ``entry``, or ``None`` if it was never stored.

        Args:
            entry: ``(i, j, k)``.
        """
        return self._entries.get(_as_entry(entry))

    def put(self, entry: tuple[int, int, int], value: float) -> None:
        """Store ``value`` for ``entry`` and persist the whole table atomically.

        Args:
            entry: ``(i, j, k)`` integers.
            value: Any float, including NaN and +-inf.

        Raises:
            TypeError: If ``entry`` is not three integers or ``value`` is not a number.
            OSError: If the file cannot be written; the in-memory table is left unchanged.
        """
        entry = _as_entry(entry)
        value = _as_value(entry, value)
        old = self._entries.get(entry)
        if old is not None and (old == value or (math.isnan(old) and math.isnan(value))):
            return  # nothing changed: skip the rewrite
        self._entries[entry] = value
        try:
            self._write()
        except BaseException:
            # Keep memory equal to disk so a caller that survives the error sees the truth.
            if old is None:
                del self._entries[entry]
            else:
                self._entries[entry] = old
            raise

    def items(self) -> dict[tuple[int, int, int], float]:
        """A copy of all cached entries."""
        return dict(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        try:
            return _as_entry(entry) in self._entries  # type: ignore[arg-type]
        except TypeError:
            return False

    def __repr__(self) -> str:
        return f"TableCache({str(self._path)!r}, {len(self)} entries)"

    # ------------------------------------------------------------------ reading

    def _load(self) -> dict[Entry, float]:
        """Read the file; on any problem warn, move it aside and return an empty table."""
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as err:
            return self._reject(_Reject("corrupt", f"cannot be read ({err})"))
        try:
            return self._parse(text)
        except _Reject as rej:
            return self._reject(rej)

    def _parse(self, text: str) -> dict[Entry, float]:
        """Validate ``text`` and decode its entries, raising :class:`_Reject` on problems."""
        try:
            doc = json.loads(text)
        except ValueError as err:  # includes truncated files
            raise _Reject("corrupt", f"is not valid JSON ({err})") from None
        if not isinstance(doc, dict) or not {"format", "key", "checksum", "entries"} <= set(doc):
            raise _Reject("corrupt", "lacks the format/key/checksum/entries fields")
        if doc["format"] != FORMAT_VERSION:
            raise _Reject("stale", f"has format version {doc['format']!r}, expected {FORMAT_VERSION}")
        if not isinstance(doc["entries"], list):
            raise _Reject("corrupt", "has an 'entries' field that is not a list")
        try:
            expected = _checksum(doc["format"], doc["key"], doc["entries"])
        except (TypeError, ValueError):
            expected = None
        if doc["checksum"] != expected:
            raise _Reject("corrupt", "fails its checksum (edited or partially written)")
        if doc["key"] != self._key:
            raise _Reject("stale", f"was written for another key ({_diff(doc['key'], self._key)})")
        return _decode_entries(doc["entries"])

    def _reject(self, rej: _Reject) -> dict[Entry, float]:
        """Warn about a bad file, rename it to ``<name>.<kind>`` and return an empty table."""
        aside = self._path.with_name(f"{self._path.name}.{rej.kind}")
        try:
            os.replace(self._path, aside)
            where = f"moved it to {aside}"
        except OSError as err:
            where = f"could not move it aside ({err}); it will be overwritten on the next put"
        warnings.warn(
            f"table cache {self._path} {rej.reason}: {rej.kind}, not trusted; {where} and "
            "starting with an empty table",
            TableCacheWarning,
            stacklevel=4,
        )
        return {}

    # ------------------------------------------------------------------ writing

    def _write(self) -> None:
        """Atomically replace the file with the current table (temp file + fsync + replace)."""
        entries = [[i, j, k, _encode_value(v)] for (i, j, k), v in sorted(self._entries.items())]
        doc = {
            "format": FORMAT_VERSION,
            "key": self._key,
            "checksum": _checksum(FORMAT_VERSION, self._key, entries),
            "entries": entries,
        }
        directory = self._path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # Same directory as the target: os.replace is only atomic within one file system.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self._path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, indent=1, allow_nan=False))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode(self._path))
            os.replace(tmp, self._path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(directory)


# ---------------------------------------------------------------------- helpers


def _as_entry(entry: object) -> Entry:
    """Normalise ``entry`` to a tuple of three ints."""
    try:
        i, j, k = entry  # type: ignore[misc]
        return (operator.index(i), operator.index(j), operator.index(k))
    except (TypeError, ValueError):
        raise TypeError(f"table entries must be (i, j, k) triples of ints, got {entry!r}") from None


def _as_value(entry: Entry, value: object) -> float:
    """Convert a value to float with an error naming the entry."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"value for {entry} must be a number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"value for {entry} must be a number, got {value!r}") from None


def _encode_value(value: float) -> float | str:
    """Finite floats stay floats; NaN/+-inf become strings (plain JSON has no such literals)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _decode_entries(rows: list) -> dict[Entry, float]:
    """Decode ``[[i, j, k, value], ...]``; raise :class:`_Reject` on malformed rows."""
    out: dict[Entry, float] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4
                and all(type(v) is int for v in row[:3])):
            raise _Reject("corrupt", f"has a malformed entry {row!r}")
        value = row[3]
        if isinstance(value, str) and value in _NON_FINITE:
            value = _NON_FINITE[value]
        elif type(value) not in (int, float):
            raise _Reject("corrupt", f"has a malformed value in entry {row!r}")
        entry = (row[0], row[1], row[2])
        if entry in out:
            raise _Reject("corrupt", f"lists entry {entry} twice")
        out[entry] = float(value)
    return out


def _checksum(fmt: Any, key: Any, entries: Any) -> str:
    """SHA-256 over the canonical JSON of format, key and entries."""
    return fingerprint({"format": fmt, "key": key, "entries": entries})


def _diff(found: Any, expected: dict[str, Any]) -> str:
    """Describe how a file's key differs from the expected one."""
    if not isinstance(found, dict):
        return f"key is {found!r}"
    names = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    shown = ", ".join(f"{n}: file {found.get(n)!r} != {expected.get(n)!r}" for n in names[:5])
    return shown + (" ..." if len(names) > 5 else "")


def _file_mode(path: Path) -> int:
    """Permission bits for the new file: those of the old file, else 0o644."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def _unlink_quietly(path: str) -> None:
    """Remove a temp file, ignoring errors (it may already be gone)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename itself durable (POSIX; not supported on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""What an artifact records: the kind/keys/format check every reader makes before trusting a record, and
:class:`Recorded`, the attribute that reads one key of the record a loaded artifact wraps."""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, overload

from fmask.core.errors import FmaskError
from fmask.core.hashing import FORMAT_VERSION

T = TypeVar("T")
_REQUIRED = object()


def check_record(record: dict, *, kind: str, keys: Sequence[str], not_ours: str, newer: str) -> None:
    """Refuse, one line each, a record of a newer format (``newer`` names it: "checkpoint X.pt") and one that is
    not of ``kind`` or lacks one of ``keys`` (``not_ours`` is the whole line, with its fix)."""
    written = record.get("format", 0)
    if isinstance(written, int) and written > FORMAT_VERSION:
        raise FmaskError(f"{newer} was written by a newer fmask (format {written}); upgrade fmask")
    if record.get("kind") != kind or any(key not in record for key in keys):
        raise FmaskError(not_ours)


class Recorded(Generic[T]):
    """A read-only attribute that is one key of the record an artifact object holds: ``pool_hash =
    Recorded[str]("state")`` reads ``self.state["pool_hash"]``. ``key`` defaults to the attribute's name;
    ``default`` serves records written before the key existed; ``convert`` turns the stored value into ``T``."""

    def __init__(self, record: str, key: Optional[str] = None, *, default: Any = _REQUIRED,
                 convert: Optional[Callable[[Any], T]] = None) -> None:
        self.record, self.key, self.default, self.convert = record, key, default, convert

    def __set_name__(self, owner: type, name: str) -> None:
        if self.key is None:
            self.key = name

    @overload
    def __get__(self, obj: None, owner: type) -> Recorded[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        record = getattr(obj, self.record)
        value = record[self.key] if self.default is _REQUIRED else record.get(self.key, self.default)
        return self.convert(value) if self.convert is not None else value

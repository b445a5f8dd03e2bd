"""``with thing:`` for everything that has ``start()`` and ``stop()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Started:
    """Mixin: entering starts, leaving stops (also on an exception)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Files a dataset commit asks for by name, read again from the source one at a time.

Preparation checks each kept file and remembers its index and sha256; the commit then asks
for the bytes by name. Reading them again (not holding them) keeps a large dataset out of
memory, and the sha256 check refuses a file that changed since it was checked rather than
commit it unchecked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping

from engine.data.errors import DatasetError

#: ``read(index)`` -> (how a changed file is named in the error, its bytes now).
Reader = Callable[[int], tuple[str, bytes]]


class RereadFiles(Mapping[str, bytes]):
    """``files`` ({name: (index, sha256)}) as the commit wants them (name -> bytes)."""

    def __init__(self, files: dict[str, tuple[int, str]], read: Reader) -> None:
        self._files, self._read = files, read

    def __getitem__(self, name: str) -> bytes:
        index, sha256 = self._files[name]
        what, data = self._read(index)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DatasetError(f"{what} changed while it was prepared")
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

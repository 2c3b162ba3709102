"""program.md: the researcher's rules, when the campaign's trainer ships one in its harness."""

from __future__ import annotations

import tarfile
import zlib

from services.contracts import harness_file

# What a damaged harness archive raises while it is read (a truncated or corrupt gzip).
ARCHIVE_ERRORS: tuple[type[Exception], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)


def program_from_harness(archive: bytes) -> str:
    """The text of program.md in a harness archive; "" when the trainer has none."""
    data = harness_file(archive, "program.md")
    return "" if data is None else data.decode(errors="replace")

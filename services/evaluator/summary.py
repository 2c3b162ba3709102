"""Parse the trainer's summary block (DESIGN §5): the last `---` line, then `key: number` lines.

```
---
val_bpb:          0.997900
training_seconds: 300.1
...
```
"""

from __future__ import annotations

import re

_KEY_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([-+]?(?:[0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?:[eE][-+]?[0-9]+)?|[-+]?(?:nan|inf|infinity))\s*$", re.IGNORECASE)


def _lines(log_text: str) -> list[str]:
    """Lines, where a carriage return (a progress bar's redraw) also ends a line."""
    return re.split(r"\r\n|\r|\n", log_text)


def parse_summary(log_text: str) -> dict[str, float] | None:
    """The keys and values of the last summary block; None when there is none.

    The block starts at the last line that is exactly `---` and runs over the `key: number`
    lines right after it; whatever follows (a warning at exit, a launcher note) is ignored.
    A `---` with no key line after it (a run cut off right there) is no block.
    """
    lines = _lines(log_text)
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return None
    values: dict[str, float] = {}
    for line in lines[starts[-1] + 1:]:
        if not line.strip() and not values:
            continue
        match = _KEY_LINE.match(line)
        if match is None:
            break
        values[match.group(1)] = float(match.group(2).replace("_", ""))
    return values or None

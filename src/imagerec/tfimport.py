"""TensorFlow imported the way every entry point wants it: without its native start-up chatter.

The command line sets TF_CPP_MIN_LOG_LEVEL=2 unless -v asks for everything; the TensorFlow engine
and training import TensorFlow through `import_tensorflow`, which makes that level hold for the
lines TensorFlow logs before it reads the setting.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# A native log line: severity letter, MMDD, time (absl's and glog's prefix).
_NATIVE_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d")
_SEVERITIES = "IWEF"
_ABSL_BANNER = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)


def import_tensorflow() -> None:
    """Import TensorFlow once, with its start-up chatter held to TF_CPP_MIN_LOG_LEVEL.

    TensorFlow's libraries log through absl before they have read TF_CPP_MIN_LOG_LEVEL, so its
    "oneDNN custom operations are on" notice and absl's banner above it reach the terminal
    whatever the setting says. The import writes to a file instead of file descriptor 2, and
    whatever the setting allows (any error, any Python warning, and any line another thread
    wrote meanwhile) is written to stderr after it. With the level unset or 0, nothing is held.
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    if "tensorflow" in sys.modules or level in ("", "0"):
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = native_lines_to_show(text, level)
            sys.stderr.write(kept)


def native_lines_to_show(text: str, min_level: str) -> str:
    """The lines of `text` that TF_CPP_MIN_LOG_LEVEL=min_level lets through (others: all)."""
    level = int(min_level) if min_level.isdigit() else 0
    kept = []
    for line in text.splitlines(keepends=True):
        if level > 0 and line.rstrip("\n") == _ABSL_BANNER:
            continue
        match = _NATIVE_LOG_LINE.match(line)
        if match and _SEVERITIES.index(match.group(1)) < level:
            continue
        kept.append(line)
    return "".join(kept)

"""The command line's terminal output: imagerec's own lines, not TensorFlow's start-up chatter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from imagerec.tfimport import native_lines_to_show

SAMPLE = Path(__file__).parent / "fixtures" / "samples" / "cat.jpg"
BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
CHATTER = [
    BANNER,
    "I0000 00:00:1796153744.970503    7254 port.cc:153] oneDNN custom operations are on.",
    "W0000 00:00:1796153744.970503    7254 cpu_feature_guard.cc:227] This binary is optimized.",
]
REAL = [
    "E0000 00:00:1796153744.970503    7254 loader.cc:12] could not load a kernel library",
    "/site-packages/x.py:3: UserWarning: a real warning",
]


def _env_without_tf_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}


def test_the_default_level_drops_info_warnings_and_the_banner_but_keeps_errors():
    text = "\n".join(CHATTER + REAL) + "\n"
    assert native_lines_to_show(text, "2") == "\n".join(REAL) + "\n"
    assert native_lines_to_show(text, "0") == text  # TF_CPP_MIN_LOG_LEVEL=0 asks for all


def test_predict_prints_its_answer_and_nothing_else():
    result = subprocess.run(
        [sys.executable, "-m", "imagerec.cli", "predict", str(SAMPLE)],
        capture_output=True,
        text=True,
        env=_env_without_tf_settings(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{SAMPLE}: cat ")


def test_the_quiet_import_lets_errors_and_python_warnings_through(tmp_path):
    # A stand-in `tensorflow` that writes to file descriptor 2 the way the real one's native
    # libraries do, and warns from Python.
    native = "".join(f"os.write(2, {line + chr(10)!r}.encode())\n" for line in CHATTER + REAL[:1])
    (tmp_path / "tensorflow.py").write_text(
        f"import os, warnings\n{native}warnings.warn('a real warning from the import')\n"
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from imagerec.tfimport import import_tensorflow
        import_tensorflow()
        print("imported", file=sys.stderr)
        """
    )
    env = _env_without_tf_settings() | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert REAL[0] in lines
    assert any("UserWarning: a real warning from the import" in line for line in lines)
    assert lines[-1] == "imported"  # the kept lines come out at the import, not later
    for line in CHATTER:
        assert line not in lines

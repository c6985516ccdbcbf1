"""Run an emitted training script so that its checkpoint save of one step hangs half-written.

    python stall_save.py train_x.py ARGS...      with PTCOMPILE_TEST_STALL_STEP=N, PTCOMPILE_TEST_STALL_MARKER=FILE

torch.save is wrapped: when the script writes the state of checkpoint N (a path inside
.checkpoint-N.tmp/), the wrapper writes the first half of the real bytes, creates FILE and sleeps, so a test
can SIGKILL the process in the middle of a save. The script itself is unchanged: it runs as __main__.
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import time
from pathlib import Path

import torch

STEP = int(os.environ["PTCOMPILE_TEST_STALL_STEP"])
MARKER = Path(os.environ["PTCOMPILE_TEST_STALL_MARKER"])
_save = torch.save


def stalling_save(obj, f, *args, **kwargs):
    path = Path(str(f)) if isinstance(f, (str, os.PathLike)) else None
    if path is not None and path.parent.name == f".checkpoint-{STEP}.tmp" and path.name == "state.pt":
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with path.open("wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        MARKER.write_text(str(path))
        time.sleep(3600)
    return _save(obj, f, *args, **kwargs)


torch.save = stalling_save
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")

"""`make demo`: the main job on the embedded default, end to end, with no download.

1. validate the knowledge base;  2. write the tiny model and data;  3. compile the DPO script for the tiny
model;  4. train it on CPU for a few dozen steps;  5. regenerate generated/ and build the reference site;
6. print where everything went.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path = ROOT) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def main() -> None:
    started = time.time()
    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    ptcompile = str(BIN / "ptcompile")
    run(ptcompile, "validate")
    run(ptcompile, "tiny", str(DEMO / "ptcompile-tiny"))
    # The paper's learning rate (1e-6) is for 7B models and thousands of steps; the tiny model needs more.
    run(
        ptcompile, "dpo", "--model", "tiny", "-o", str(DEMO / "train_dpo.py"),
        "--set", "learning_rate=0.001", "--set", "per_device_train_batch_size=8", "--set", "gradient_accumulation_steps=1",
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_MKDOCS_2_WARNING="1")
    print("$ python train_dpo.py --max_steps 40 --logging_steps 5 --save_steps 20", flush=True)
    subprocess.run(
        [sys.executable, "train_dpo.py", "--max_steps", "40", "--logging_steps", "5", "--save_steps", "20", "--output_dir", "runs/dpo"],
        cwd=DEMO, env=env, check=True,
    )
    metrics = [json.loads(line) for line in (DEMO / "runs/dpo/metrics.jsonl").read_text().splitlines()]
    run(ptcompile, "build")
    subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--quiet"], cwd=ROOT / "site", env=env, check=True)
    first, last = metrics[0], metrics[-1]
    print()
    print("DPO on the tiny model:")
    print(f"  step {first['step']:>3}: loss {first['loss']:.3f}  reward margin {first['rewards/margin']:+.3f}  accuracy {first['rewards/accuracy']:.2f}")
    print(f"  step {last['step']:>3}: loss {last['loss']:.3f}  reward margin {last['rewards/margin']:+.3f}  accuracy {last['rewards/accuracy']:.2f}")
    print()
    print("Outputs:")
    print(f"  tiny model and data   {DEMO / 'ptcompile-tiny'}")
    print(f"  compiled script       {DEMO / 'train_dpo.py'}")
    print(f"  metrics               {DEMO / 'runs/dpo/metrics.jsonl'}")
    print(f"  checkpoint            {DEMO / 'runs/dpo/checkpoint-20'}")
    print(f"  trained model         {DEMO / 'runs/dpo/final'}")
    print(f"  generated scripts     {ROOT / 'generated'}")
    print(f"  reference site        {ROOT / 'site/build/index.html'}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

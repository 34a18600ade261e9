"""``dist-peft profile`` as a script (docs/profiling.md): ``python tools/profiler.py --config FILE ...``, or under
torchrun ``torchrun --nproc_per_node 4 tools/profiler.py --config configs/tiny-lora-tp2pp2.yaml``.

Not named ``profile.py``: on ``sys.path`` that name would shadow the standard library's ``profile`` module,
which ``cProfile`` (imported by transformers) needs."""

import sys

from dist_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))

"""``python -m dist_peft.integrations.deepspeed_launch ARGS``: DeepSpeed's launcher (``deepspeed.launcher.runner``,
same arguments; launch/deepspeed.sh) with a quiet console (issue 19).

The accelerator is named as dist_peft picks its device (``runtime.name_deepspeed_accelerator``) before DeepSpeed
is imported; the node launcher it starts and every rank inherit it, so none of them warns "Setting accelerator to
CPU". The launcher's own log goes through ``logs.py`` (its known notices summarised).
"""

import sys

from dist_peft import logs
from dist_peft.parallel.runtime import name_deepspeed_accelerator


def main() -> None:
    name_deepspeed_accelerator()
    logs.setup()
    from deepspeed.launcher.runner import main as runner

    runner()


if __name__ == "__main__":
    sys.exit(main())

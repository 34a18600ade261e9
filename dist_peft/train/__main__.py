"""``python -m dist_peft.train --config FILE`` is ``dist-peft train --config FILE``."""

import sys

from dist_peft.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

#!/usr/bin/env python
"""Does llama_port reproduce transformers on a checkpoint? Same as ``llama-port parity``:

    python scripts/parity_check.py [CHECKPOINT] [--dtype ...] [--json PATH|-] [--plot PATH] ...

Exit code 0 passed, 1 failed, 2 bad usage or unreadable input.
"""

import sys

from llama_port.cli import main

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]]))

"""``python -m llama_port ...`` runs the ``llama-port`` command (what torchrun launches)."""

import sys

from .cli import main

sys.exit(main())

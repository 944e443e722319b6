"""Import hygiene: importing llama_port and llama_port.checkpoints pulls in torch only, none of the
optional packages (safetensors, huggingface_hub, accelerate, transformers, gguf), checked in a fresh
interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_port


def test_importing_llama_port_needs_torch_only():
    code = (
        "import sys, llama_port, llama_port.checkpoints;"
        "optional = ('safetensors', 'huggingface_hub', 'accelerate', 'transformers', 'gguf');"
        "bad = [m for m in optional if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(llama_port.__file__).parent.parent)

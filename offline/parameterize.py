"""Offline entry point: `python -m offline.parameterize ...` is `prag parameterize ...`."""

import sys

from prag_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["parameterize", *sys.argv[1:]]))

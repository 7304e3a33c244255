"""Offline entry point: `python -m offline.merge ...` is `prag merge ...`."""

import sys

from prag_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))

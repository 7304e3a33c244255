"""Offline entry point: `python -m offline.augment ...` is `prag augment ...`."""

import sys

from prag_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))

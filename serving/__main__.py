"""``python -m serving [--config server.toml] [--port 8000] ...``: the OpenAI-compatible server."""

import sys

from serving.server import main

if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())

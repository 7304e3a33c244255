"""The OpenAI-compatible FastAPI server (see the server issue); empty for now."""

"""`gpt2lab serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

    scheduler  the engine: one thread owns the model and a preallocated KV pool of rows; requests
               join the running decode batch at token boundaries (torch only)
    protocol   OpenAI request bodies validated field by field, and OpenAI's error object (no imports)
    app        FastAPI routes over the engine, the API key / body-size gate, /metrics
"""

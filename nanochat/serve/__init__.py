"""
The chat web server: the chat page, nanochat's streaming API and the OpenAI-compatible one, over a pool of model
replicas (python -m scripts.chat_web runs it).

    schemas      request and response models, their limits, APIError
    pool         Worker (one model replica), ModelPool (the replicas of a model and their bounded queue), Stats
    generation   the prompt of a request, and its generation in a replica's thread: cancelled when the client goes
                 away, stopped at the time limit
    app          create_app: body limit, JSON errors, routes, server-sent events
"""

from nanochat.serve.app import create_app
from nanochat.serve.pool import Worker, load_workers

__all__ = ["Worker", "create_app", "load_workers"]

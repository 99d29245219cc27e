"""CLI sub-commands: each module defines ``register(app)`` and is discovered automatically."""

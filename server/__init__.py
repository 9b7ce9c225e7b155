"""The coordinator side: the Flower ServerApp, its strategies and checkpoints."""

"""Search your own videos with a trained model: `index` (index.py), `search` (search.py), `serve` (server.py)."""

"""``python -m cfo``: the command line (same as the ``cfo`` script)."""

from cfo.cli import app

if __name__ == "__main__":
    app()

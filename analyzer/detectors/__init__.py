"""Model backends behind small interfaces (see base.py); one module per backend."""

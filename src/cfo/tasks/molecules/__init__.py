"""Molecules: a GEOM-like 3D dataset with real GFN2-xTB labels (tblite) and the RDKit chemistry toolkit.

The core (``cfo.problem``, ``cfo.loop``, solvers, flows) never imports this package; it imports the core.
"""

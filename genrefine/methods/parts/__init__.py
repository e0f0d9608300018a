"""Machinery shared by several methods (n-gram index, datastore, heads, lattice, draft model
runner, text bridge, self-drafting, draft-size control, draft vocabularies, stored drafters).
Nothing here imports a method module."""

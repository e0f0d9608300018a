"""The methods, one module per method (a README row): its drafter or decoding loop, its
builder and its :data:`SPEC`. Shared machinery is in :mod:`genrefine.methods.parts`, the types
every method uses in :mod:`genrefine.methods.base`; the registry that collects the specs is
:mod:`genrefine.registry`, above this package (nothing here imports it)."""

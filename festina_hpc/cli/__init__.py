"""The ``festina`` admin CLI: thin click commands over the library."""

"""The ``msrnn`` command line."""

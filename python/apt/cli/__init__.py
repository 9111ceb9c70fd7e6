"""The ``apt`` command line."""

"""The ``moedd`` command line (Typer). Installed as ``moedd.cli``; thin layer over the library."""

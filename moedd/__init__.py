"""moedd: dataset distillation with a mixture of experts.

The library (this package) has no CLI and prints nothing: functions take explicit typed
arguments and return values. The Typer app is ``moedd.cli`` (the top-level ``cli/`` folder).
"""

__version__ = "0.1.0"

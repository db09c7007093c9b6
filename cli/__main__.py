"""``python -m moedd.cli`` runs the command line (MLflow then tags the git commit itself)."""

from .main import run

run()

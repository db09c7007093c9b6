"""``python -m moedd.cli`` runs the command line (MLflow then tags the git commit itself)."""

from moedd.cli.main import run

run()

"""python -m minilae.experiments TASK ... (see minilae.experiments.cli)."""
import sys

from .cli import main

sys.exit(main())

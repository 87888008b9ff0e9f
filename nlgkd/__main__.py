"""`python -m nlgkd`: the same as the `nlgkd` command."""
import sys

from .cli import main

sys.exit(main())

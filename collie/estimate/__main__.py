"""``python -m collie.estimate ...`` = ``collie estimate ...``."""
import sys

from collie.estimate.cli import estimate_main

sys.exit(estimate_main())

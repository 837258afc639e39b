import sys

from collie.cli import main

sys.exit(main())

"""`python -m topocl ...` == `topocl ...`."""

import sys

from topocl.cli import main

sys.exit(main())

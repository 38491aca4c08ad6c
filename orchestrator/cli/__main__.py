"""`python -m orchestrator.cli` is `flotilla`."""

import sys

from orchestrator.cli import main

sys.exit(main())

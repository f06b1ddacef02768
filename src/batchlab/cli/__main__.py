"""``python -m batchlab.cli``."""

from batchlab.cli import main

raise SystemExit(main())

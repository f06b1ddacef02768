"""``python -m batchlab``: the ``batchlab`` command, for environments without the script on PATH."""

from batchlab.cli import main

raise SystemExit(main())

"""``python -m worker`` runs the same command line as ``supersim-worker``."""

from worker.cli.main import main

raise SystemExit(main())

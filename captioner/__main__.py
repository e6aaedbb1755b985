"""``python -m captioner`` is the ``captioner`` command."""

from captioner.cli import main

raise SystemExit(main())

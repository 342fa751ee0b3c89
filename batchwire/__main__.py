"""`python -m batchwire` runs the `batchwire` command line."""

from batchwire.cli import main

raise SystemExit(main())

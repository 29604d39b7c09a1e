"""`python -m memprobe ...` is the `memprobe` command."""

from memprobe.cli import main

raise SystemExit(main())

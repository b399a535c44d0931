"""``python -m bench``: run every case of the talk's two tables (see :mod:`bench.run`)."""

from .run import main

raise SystemExit(main())

"""``python -m diagode_dist.bench``: see :func:`diagode_dist.bench.main`."""

import sys

from diagode_dist.bench import main

sys.exit(main())

"""``python -m expbuild_worker`` is the ``expbuild-worker`` command."""

import sys

from expbuild_worker.cli import main

sys.exit(main())

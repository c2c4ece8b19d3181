"""``python -m nqe``: the same as the ``nqe`` command."""

import sys

from nqe.cli import main

sys.exit(main())

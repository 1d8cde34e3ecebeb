"""``python -m trainmem ...`` is the ``trainmem`` command."""

import sys

from trainmem.launch.cli import main

sys.exit(main())

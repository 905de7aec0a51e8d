"""``python -m prefixtune`` (and ``accelerate launch -m prefixtune``): the ``prefixtune`` command."""

import sys

from .cli import main

sys.exit(main())

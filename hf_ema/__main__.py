"""``python -m hf_ema``: the ``hf-ema`` command line (see :mod:`hf_ema.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

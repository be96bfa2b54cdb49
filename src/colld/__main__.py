"""``python -m colld`` (and ``accelerate launch -m colld distill ...``)."""

import sys

from colld.cli import main

sys.exit(main())

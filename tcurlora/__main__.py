"""``python -m tcurlora`` (and ``torchrun -m tcurlora finetune ...``): the command line."""

import sys

from .cli import main

sys.exit(main())

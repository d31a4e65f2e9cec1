"""`python -m gpt2lab ...` and `torchrun -m gpt2lab ...` enter here."""

import sys

from gpt2lab.cli import main

sys.exit(main())

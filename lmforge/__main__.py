"""`python -m lmforge ...` (also what `torchrun -m lmforge pretrain ...` runs)."""
import sys

from .cli import main

sys.exit(main())

"""`python -m treeq ...`, the form torchrun needs: `torchrun --nproc_per_node N -m treeq sample ...`."""
import sys

from .cli import main

sys.exit(main())

"""`python -m dbrx ...`, the form torchrun starts: `torchrun --nproc_per_node 2 -m dbrx train CONFIG.yaml`."""

import sys

from dbrx.cli import main

sys.exit(main())

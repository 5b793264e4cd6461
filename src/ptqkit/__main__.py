"""`python -m ptqkit ...` (as `torchrun ... -m ptqkit quantize ...` needs): the `ptqkit` command."""
from ptqkit.cli import main

raise SystemExit(main())

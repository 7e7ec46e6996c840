"""``python -m megatron_revisual.evaluation ...`` runs `revisual eval`."""

import sys

from megatron_revisual.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main())

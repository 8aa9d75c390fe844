import sys

from moqe_jax.cli import main

sys.exit(main())

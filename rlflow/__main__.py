"""``python -m rlflow`` (what ``deepspeed --num_gpus N -m rlflow run FILE`` launches)."""

import sys

from rlflow.cli import main

sys.exit(main())

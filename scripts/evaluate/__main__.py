"""``python -m deepfeat.scripts.evaluate``: the same as ``deepfeat eval``."""

from deepfeat.scripts.evaluate import main

raise SystemExit(main())

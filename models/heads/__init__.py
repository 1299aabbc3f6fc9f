"""Classifier heads on deep features: your own classes instead of ImageNet's.

Two ways to learn them, in the order small data usually prefers them: ``linear`` (a logistic regression
on frozen embeddings, :mod:`.linear`) and ``finetune`` (the top blocks of the backbone trained with a
new head, :mod:`.finetune`). A trained head is saved as a directory with a ``head.json`` manifest
(:mod:`.storage`) and evaluated with the report in :mod:`.evaluation`; :mod:`.training` holds what both
methods share and :mod:`.errors` the ``HeadError`` tree.
"""

from __future__ import annotations

from deepfeat.fingerprints import differences as fingerprint_differences
from deepfeat.models.heads.errors import (
    CorruptHeadError,
    HeadError,
    HeadExistsError,
    IncompatibleHeadError,
    InvalidHeadNameError,
    NoLabelsError,
    TrainingDataError,
    UnknownHeadError,
)
from deepfeat.models.heads.evaluation import evaluate, knn_vote, predictions_from_probabilities
from deepfeat.models.heads.finetune import (
    FineTuneConfig,
    FineTunedNet,
    ProgressBar,
    build_finetune_net,
    fine_tune,
    finetune_state,
    finetuned_from_state,
    finetuned_probabilities,
    top_blocks,
)
from deepfeat.models.heads.linear import LinearConfig, LinearHead, train_linear
from deepfeat.models.heads.storage import (
    FINETUNE_COMPATIBLE_KEYS,
    HEAD_FORMAT_VERSION,
    MANIFEST_FILE,
    METHODS,
    RESERVED_NAMES,
    HeadManifest,
    check_compatible,
    check_head_name,
    finetune_bytes,
    iter_head_dirs,
    linear_bytes,
    load_finetune_state,
    load_linear,
    read_manifest,
    save_head,
)
from deepfeat.models.heads.training import TrainingLog, stratified_split

__all__ = [
    "HEAD_FORMAT_VERSION",
    "MANIFEST_FILE",
    "METHODS",
    "RESERVED_NAMES",
    "FINETUNE_COMPATIBLE_KEYS",
    "HeadError",
    "TrainingDataError",
    "InvalidHeadNameError",
    "HeadExistsError",
    "CorruptHeadError",
    "IncompatibleHeadError",
    "UnknownHeadError",
    "NoLabelsError",
    "LinearHead",
    "LinearConfig",
    "FineTuneConfig",
    "TrainingLog",
    "FineTunedNet",
    "HeadManifest",
    "check_head_name",
    "stratified_split",
    "train_linear",
    "top_blocks",
    "build_finetune_net",
    "fine_tune",
    "finetune_state",
    "evaluate",
    "predictions_from_probabilities",
    "knn_vote",
    "fingerprint_differences",
    "check_compatible",
    "save_head",
    "read_manifest",
    "load_linear",
    "load_finetune_state",
    "linear_bytes",
    "finetune_bytes",
    "finetuned_from_state",
    "finetuned_probabilities",
    "iter_head_dirs",
    "ProgressBar",
]

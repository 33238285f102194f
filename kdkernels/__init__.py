"""kdkernels: fused knowledge-distillation losses for medical imaging.

    import kdkernels as kdk
    loss = kdk.attention_transfer_loss(student_feat, teacher_feat, p=2.0)

Every loss takes the student first (it receives the gradient) and the teacher second (a target),
plus `backend="auto" | "torch" | "triton" | "cuda" | "cpu"`. `kdk.backends()` reports what this
installation can run and why not; `kdk.reference` holds the eager PyTorch ground truth;
`kdk.info()` (or `python -m kdkernels`) reports versions, build and backends and checks every
fused backend against the reference.
"""

from kdkernels import losses, reference
from kdkernels._dispatch import backends
from kdkernels._info import info
from kdkernels.functional import (
    attention_transfer_loss,
    channel_relation_loss,
    channel_wise_kl_loss,
    logit_attention_loss,
    pixel_kl_loss,
    pixel_relation_loss,
    sgm_loss,
    structure_loss,
)

__version__ = "0.1.0"

__all__ = [
    "attention_transfer_loss",
    "channel_relation_loss",
    "pixel_relation_loss",
    "sgm_loss",
    "logit_attention_loss",
    "pixel_kl_loss",
    "channel_wise_kl_loss",
    "structure_loss",
    "backends",
    "info",
    "reference",
    "losses",
]

"""The FlowID / FINEdits edit path (SPEC.md sec. 5, FlowID paper 000 Algorithm 1, FINEdits paper 002).

    1. fine-tune the backbone on ONE image-prompt pair (:mod:`.finetune`)
    2. invert z0 with the source prompt from t = 0 to the strength t_s, keeping the trajectory
    3. mask from image-to-concept attention at t_M, k-means, max-pool dilation, blur (:mod:`.mask`)
    4. denoise t_s -> 0 with the target prompt, z_{t-1} = M z'_{t-1} + (1 - M) z_ref_{t-1}
    5. decode

Backbones (:mod:`.backbone`): SD3 (rectified flow, the papers' choice) and idforge's SD1.5-based
generator / an ``idforge export`` folder (DDIM, epsilon or v prediction), behind one interface.
"""

from .backbone import EditBackbone, FlowBackbone, Guided, UNetBackbone, load_backbone
from .editor import PRESETS, Editor, EditResult, Preset
from .finetune import FinetuneConfig, finetune
from .mask import kmeans_mask, make_mask

__all__ = [
    "PRESETS",
    "EditBackbone",
    "EditResult",
    "Editor",
    "FinetuneConfig",
    "FlowBackbone",
    "Guided",
    "Preset",
    "UNetBackbone",
    "finetune",
    "kmeans_mask",
    "load_backbone",
    "make_mask",
]

"""``idforge convert-onnx``: an insightface recognition ONNX -> an idforge face-encoder folder.

The conversion itself (graph -> torch :class:`~idforge.models.face.iresnet.IResNet`) lives in
:mod:`idforge.models.face.onnx_convert`; this command only writes the result the way
:meth:`~idforge.models.face.face_encoder.FaceEncoder.save_pretrained` does, so the folder loads
with ``FaceEncoder.from_pretrained`` (and as ``face_encoder:`` in a training config) without
re-reading the ONNX graph each time.
"""

from __future__ import annotations

from pathlib import Path

from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.onnx_convert import onnx_to_iresnet


def convert_onnx(onnx: Path, out: Path) -> Path:
    """Convert an insightface recognition ONNX (IResNet ArcFace) into a FaceEncoder folder.

    Args:
        onnx: the recognition model, e.g. ``~/.insightface/models/antelopev2/glintr100.onnx`` or
            buffalo_l's ``w600k_r50.onnx``.
        out: folder to write ``config.json`` + ``model.safetensors`` into (created if missing;
            files already there are replaced).

    Returns:
        The folder written.
    """
    model, report = onnx_to_iresnet(Path(onnx).expanduser())
    folder = FaceEncoder(model).save_pretrained(Path(out).expanduser())
    print(f"converted {onnx} ({report['arch']}) -> {folder}")
    return folder

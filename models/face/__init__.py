"""idforge.models.face: the ArcFace face encoder, every form its weights come in, and what feeds it.

=======================  ==========================================================================
module                   holds
=======================  ==========================================================================
``iresnet``              :class:`IResNet` + :class:`IResNetConfig`, the ArcFace backbone in
                         arcface_torch's layout (its ``backbone.pth`` loads with ``strict=True``)
``face_encoder``         :class:`FaceEncoder`: frozen, differentiable 512-d embedder; loads an idforge
                         folder, a ``backbone.pth``/``.safetensors`` or an insightface ``.onnx``
``onnx_convert``         :func:`onnx_to_iresnet`: insightface recognition ONNX -> torch IResNet
``insightface_encoder``  :class:`InsightFaceRecognizer`: batched embeddings through insightface's own
                         onnxruntime loader (curation), model-pack lookup
``align_torch``          :func:`warp_to_template`: differentiable 5-point similarity warp to the
                         112 x 112 ArcFace template (identity loss, FS metric)
``arcface_head``         :class:`ArcFaceHead`: additive angular margin head for training an encoder
=======================  ==========================================================================

The generator path (``idforge.models.generator``, ``losses``) only needs ``FaceEncoder`` and
``warp_to_template``; the rest serves curation and face-encoder training. Nothing here imports
the rest of ``idforge.models``. The command that writes a FaceEncoder folder from an ONNX file is
``idforge.launch.convert_cmd``.
"""

__all__ = ["align_torch", "arcface_head", "face_encoder", "insightface_encoder", "iresnet", "onnx_convert"]

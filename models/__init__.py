"""idforge.models: the generator's networks and where their weights come from.

=====================  ==================================================================================
file                   holds
=====================  ==================================================================================
``generator.py``       ``IdentityGenerator``: UNet + codec + text encoder + identity encoders + adapter,
                       composed (diffusers' UNet is used as is, never copied)
``adapter.py``         the Diff-ID identity adapter (projections, pooling, dual cross-attention, fusion)
``attention.py``       ``<Name>AttnProcessor`` classes that feed identity tokens into the UNet, and the
                       one walker over its attention layers
``codec.py``           image <-> denoising space: SD's VAE latents, or pixels
``image_encoder.py``   CLIP image encoder (open_clip) behind one interface
``referencenet.py``    FlashFace's Face ReferenceNet: a copy of the main UNet that encodes reference faces
                       once (fixed timestep) into per-layer states; attaches, saves and loads
``reference_attention.py``  ``ReferenceAttnProcessor`` (reference attention, lambda_feat, identity mixing)
                       and ``ReferenceFeatures`` (cached states + per-sample index/mask: variable N, drop)
``face_mask.py``       face position mask: zero-initialised ``conv_in`` widening, box mask, inpainting input
``guidance.py``        FlashFace's three-branch guidance in one batched UNet call
``losses.py``          diffusion targets, x0 prediction, Diff-ID's time-weighted identity loss
``zoo.py``             every component's real source and tiny random-weight twin, loaded by one code
                       path; ``tiny_unet`` / ``tiny_vae`` / ``tiny_face_encoder`` build single components
``tiny_tokenizer.py``  the offline CLIP-format BPE vocabulary of the tiny text encoder
``face/``              the ArcFace face encoder: IResNet, FaceEncoder, insightface/ONNX loading and
                       conversion, differentiable alignment, margin head (table in its ``__init__``)
=====================  ==================================================================================

Nothing in ``face/`` imports the rest of this package; the generator path uses only
``face.face_encoder.FaceEncoder`` and ``face.align_torch.warp_to_template`` from it.
"""

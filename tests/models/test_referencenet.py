"""Face ReferenceNet (FlashFace sec. 3.2): same weights as the main UNet, cached states, fixed timestep,
save/load with the main UNet's reference processors."""

from __future__ import annotations

import pytest
import torch
from idforge.models.face_mask import widen_conv_in
from idforge.models.reference_attention import ReferenceAttnProcessor
from idforge.models.referencenet import ReferenceNet, ReferenceNetConfig
from idforge.models.zoo import TinyConfig, tiny_unet

UNET = TinyConfig(resolution=16, unet_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)


def test_referencenet_starts_from_the_main_unet_weights_as_a_separate_copy():
    unet = tiny_unet(UNET, seed=0)
    ref = ReferenceNet.from_unet(unet)
    main_state, ref_state = unet.state_dict(), ref.unet.state_dict()
    assert main_state.keys() == ref_state.keys()
    assert all(torch.equal(main_state[k], ref_state[k]) for k in main_state)
    with torch.no_grad():
        ref.unet.conv_in.weight.add_(1.0)
    assert not torch.equal(ref.unet.conv_in.weight, unet.conv_in.weight)


def test_states_are_the_self_attention_inputs_at_the_fixed_timestep():
    unet = tiny_unet(UNET, seed=0)
    ref = ReferenceNet.from_unet(unet, ReferenceNetConfig(timestep=7))
    latents, text = torch.randn(3, 4, 6, 6), torch.randn(1, 5, 16)
    seen = {}
    block = ref.unet.up_blocks[1].attentions[1].transformer_blocks[0]
    block.norm1.register_forward_hook(lambda m, i, o: seen.update(y=o))
    ref.unet.time_proj.register_forward_hook(lambda m, i, o: seen.update(t=i[0]))
    with torch.no_grad():
        states = ref(latents, text)
    assert set(states) == set(ref.layers) and len(ref.layers) == 5  # mid + 2 x 2 up-block layers
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor"
    assert states[name].shape == (3, 36, 16) and torch.equal(states[name], seen["y"])
    assert torch.equal(seen["t"], torch.full((3,), 7))


def test_a_widened_main_unet_gives_a_latent_only_referencenet():
    unet = widen_conv_in(tiny_unet(UNET, seed=0), 5)
    ref = ReferenceNet.from_unet(unet)
    assert ref.unet.config.in_channels == 4 and unet.config.in_channels == 9
    assert torch.equal(ref.unet.conv_in.weight, unet.conv_in.weight[:, :4])


def test_save_and_load_reproduce_referencenet_and_reference_processors(tmp_path):
    unet = tiny_unet(UNET, seed=0)
    ref = ReferenceNet.from_unet(unet, ReferenceNetConfig(placement="both", timestep=5))
    ref.attach(unet)
    with torch.no_grad():
        for p in ref.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for proc in unet.attn_processors.values():
            if isinstance(proc, ReferenceAttnProcessor):
                proc.to_v_ref.weight.mul_(2.0)
    ref.save_pretrained(tmp_path, unet)
    g = torch.Generator().manual_seed(0)
    x, ctx, refs, empty = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 2, 4, 6, 6, generator=g),
        torch.randn(1, 5, 16, generator=g),
    )

    def run(u, r):
        with torch.no_grad():
            feats = r.encode_references(refs, empty)
            return u(
                x,
                torch.tensor([1, 2]),
                encoder_hidden_states=ctx,
                cross_attention_kwargs={"reference": feats},
            ).sample

    expected = run(unet, ref)
    fresh = tiny_unet(UNET, seed=0)
    loaded = ReferenceNet.from_pretrained(tmp_path, fresh)
    assert loaded.config == ref.config
    assert torch.equal(run(fresh, loaded), expected)


def test_bad_config_and_missing_folder_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="placement"):
        ReferenceNetConfig(placement="middle")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ReferenceNet.from_pretrained(tmp_path)

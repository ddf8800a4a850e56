"""digit/pretrained_vqgan.py: LlamaGen's VQ-16 layout, loaded from a checkpoint of exactly that layout.

No weights can be fetched here, so the checkpoints are randomly initialised state dicts of the layout,
saved the way LlamaGen saves them ({"model": state_dict}, with its codebook_used buffer). The layout
itself is pinned by facts of LlamaGen's published model (key names, shapes, about 72M parameters), so
a change to our module that breaks loading the real checkpoint fails here.
"""

from __future__ import annotations

import pytest
import torch

from digit.errors import ConfigError
from digit.pretrained_vqgan import LAYOUT, PretrainedVQConfig, PretrainedVQGAN, load_pretrained_vqgan
from digit.vqgan import load_vqgan, save_vqgan
from helpers import llamagen_checkpoint as checkpoint

# LlamaGen VQ-16 (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, z 256, 16384 x 8 codes): keys and shapes of its checkpoint.
LLAMAGEN_VQ16 = {
    "encoder.conv_in.weight": [128, 3, 3, 3],
    "encoder.conv_blocks.0.downsample.conv.weight": [128, 128, 3, 3],
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": [256, 128, 1, 1],
    "encoder.conv_blocks.4.attn.1.q.weight": [512, 512, 1, 1],
    "encoder.mid.1.proj_out.weight": [512, 512, 1, 1],
    "encoder.conv_out.weight": [256, 512, 3, 3],
    "quant_conv.weight": [8, 256, 1, 1],
    "quantize.embedding.weight": [16384, 8],
    "post_quant_conv.weight": [256, 8, 1, 1],
    "decoder.conv_in.weight": [512, 256, 3, 3],
    "decoder.conv_blocks.0.res.2.conv2.weight": [512, 512, 3, 3],
    "decoder.conv_blocks.0.attn.2.v.weight": [512, 512, 1, 1],
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": [256, 512, 1, 1],
    "decoder.conv_blocks.3.upsample.conv.weight": [128, 128, 3, 3],
    "decoder.conv_out.weight": [3, 128, 3, 3],
}


def test_the_layout_is_llamagens_vq16():
    with torch.device("meta"):
        state = PretrainedVQGAN(PretrainedVQConfig()).state_dict()
    for key, shape in LLAMAGEN_VQ16.items():
        assert list(state[key].shape) == shape, key
    assert 71.5e6 < sum(t.numel() for t in state.values()) < 72.5e6  # "VQ-16: 72M"
    assert PretrainedVQConfig().grid == 16  # 256 px -> 16 x 16 tokens


def test_loads_encodes_decodes_and_round_trips_through_the_artifact(tmp_path):
    model = load_pretrained_vqgan(checkpoint(tmp_path / "vq.pt"), image_size=32)
    assert (model.config.k, model.config.dim, model.config.ch, model.config.grid) == (16, 4, 32, 2)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    tokens = model.encode(images)
    assert tokens.shape == (3, 2, 2) and tokens.dtype == torch.int64 and int(tokens.max()) < 16
    decoded = model.decode_tokens(tokens.view(3, -1))  # stage 2's flat tokens
    assert decoded.shape == (3, 3, 32, 32) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    # nearest code by cosine: re-encoding the codes' own latents gives the same ids
    z = model.latents(images)
    assert torch.equal(model.lookup(z), tokens)

    save_vqgan(model, {"grid": [2, 2], "vocab_size": 16, "image_size": 32, "classes": ["a"]}, tmp_path / "out")
    loaded, meta = load_vqgan(tmp_path / "out", k=16, grid=[2, 2], image_size=32)
    assert isinstance(loaded, PretrainedVQGAN) and meta["vocab_size"] == 16
    assert torch.equal(loaded.encode(images), tokens) and torch.equal(loaded.decode_tokens(tokens), decoded)
    with pytest.raises(ConfigError, match="token grid 2, expected 7"):
        load_vqgan(tmp_path / "out", grid=7)


@pytest.mark.parametrize("edit, message", [
    ({"encoder__conv_blocks__4__attn__1__k__weight": None},
     r"missing key encoder\.conv_blocks\.4\.attn\.1\.k\.weight \(expected shape \[128, 128, 1, 1\]\)"),
    ({"decoder__conv_out__weight": torch.zeros(3, 32, 1, 1)},
     r"key decoder\.conv_out\.weight has shape \[3, 32, 1, 1\], the layout expects \[3, 32, 3, 3\]"),
    ({"encoder__extra__weight": torch.zeros(1)}, r"unexpected key encoder\.extra\.weight"),
    ({"quantize__embedding__weight": None}, r"lacks 'quantize\.embedding\.weight'"),
])
def test_a_checkpoint_of_another_layout_names_the_first_mismatch(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=rf"vqgan\.weights: .*{message}"):
        load_pretrained_vqgan(checkpoint(tmp_path / "vq.pt", **edit), image_size=32)


def test_unusable_paths_and_sizes_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; download LlamaGen's VQ-16 checkpoint"):
        load_pretrained_vqgan(tmp_path / "absent.pt", image_size=256)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot be read as a checkpoint of tensors"):
        load_pretrained_vqgan(tmp_path / "junk.pt", image_size=256)
    with pytest.raises(ConfigError, match=rf"the {LAYOUT} VQGAN downsamples by 16, so the image size must be a "
                                          r"multiple of 16"):
        load_pretrained_vqgan(checkpoint(tmp_path / "vq.pt"), image_size=28)

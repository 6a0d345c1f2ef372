"""``pooled_token_only``: a CLIP ViT whose embedding is its class token computes the last
block's MLP on that token alone, with the same embeddings as open_clip's own forward: equal
to float rounding always, bit for bit at batches of 64 rows (random weights)."""

from __future__ import annotations

import pytest
import torch

import pipeline  # noqa: F401  (torchvision guard before open_clip)
from pipeline.features import pooled_token_only


def _vit(pool_type: str = "tok", seed: int = 0):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    v = VisionTransformer(
        image_size=16, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=4.0,
        output_dim=24, pool_type=pool_type,
    )  # fmt: skip
    for p in v.parameters():  # away from the init's zeros and ones
        p.data.add_(0.05 * torch.randn_like(p))
    return v.eval()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_class_token_shortcut_gives_the_same_embeddings_bit_for_bit(batch, threads):
    v = _vit()
    x = torch.randn(batch, 3, 16, 16)
    seen = []
    hook = v.transformer.resblocks[-1].mlp.register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape))
    )
    with torch.no_grad():
        want = v(x)
        with pooled_token_only(v) as applied:
            got = v(x)
    hook.remove()
    assert applied
    assert seen == [(batch, 17, 32), (batch, 1, 32)]  # the last MLP saw the class token only
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if batch >= 64:  # the same BLAS kernel as the full block's rows: the same bits
        assert torch.equal(got, want)
    assert "forward" not in vars(v.transformer.resblocks[-1])  # restored
    with torch.no_grad():
        assert torch.equal(v(x), want)


def test_other_encoders_run_as_they_are_and_the_block_is_restored_after_an_error():
    v = _vit(pool_type="avg")  # the embedding averages the patch tokens: no shortcut
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad(), pooled_token_only(v) as applied:
        assert not applied
        got = v(x)
    with torch.no_grad():
        assert torch.equal(got, v(x))
    tok = _vit()
    with pytest.raises(RuntimeError, match="inside"), pooled_token_only(tok):
        raise RuntimeError("inside")
    assert "forward" not in vars(tok.transformer.resblocks[-1])
    with pooled_token_only(tok) as outer, pooled_token_only(tok) as inner:
        assert outer and inner
    assert "forward" not in vars(tok.transformer.resblocks[-1])  # nested: restored once

"""3D exports: ``format=nnunet`` is accepted by nnU-Net v2's own ``load_pretrained_weights`` for the network its
residual-encoder plans build, carrying the encoder's weights; ``format=monai`` loads strictly into MONAI's ResNet."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from sparkme.errors import UsageError
from sparkme.export_volumes import export_volume_state
from sparkme.files import read_torch_file, save_atomic
from sparkme.models.volumes import RESENC_L, RESENC_TINY, create_volume_backbone


class DenseOnly:
    """Stands for a ``SparseEncoder``: what the export reads from it is ``to_dense()``."""

    def __init__(self, dense: torch.nn.Module):
        self.dense = dense

    def to_dense(self) -> torch.nn.Module:
        return self.dense


def _pretrained(name: str, in_chans: int = 1) -> torch.nn.Module:
    """A dense backbone whose weights differ from any fresh initialisation (as after pretraining)."""
    dense = create_volume_backbone(name, in_chans)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for tensor in dense.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return dense


def _plans_network(config, in_chans: int, classes: int) -> torch.nn.Module:
    """The network nnU-Net builds from a residual-encoder plans file's 3d_fullres architecture entry (the keys and
    class names as nnUNetPlannerResEncL writes them)."""
    stages = len(config.features)
    arch_kwargs = {
        "n_stages": stages, "features_per_stage": list(config.features),
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * stages,
        "strides": [[s, s, s] for s in config.strides], "n_blocks_per_stage": list(config.blocks),
        "n_conv_per_stage_decoder": [1] * (stages - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                  arch_kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"], in_chans, classes,
                                  allow_init=True, deep_supervision=True)


def test_nnunet_file_is_accepted_by_nnunets_loader_and_carries_the_encoder(tmp_path):
    dense = _pretrained("resenc_tiny")
    path = save_atomic(export_volume_state(DenseOnly(dense), "resenc_tiny", "nnunet"), tmp_path / "nnunet.pt")
    network = _plans_network(RESENC_TINY, in_chans=1, classes=3)  # another class count: heads are not carried
    fresh_decoder = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("decoder.stages")}
    load_pretrained_weights(network, str(path))
    loaded = network.state_dict()
    for key, value in dense.state_dict().items():
        assert torch.equal(loaded[f"encoder.{key}"], value), key
        assert torch.equal(loaded[f"decoder.encoder.{key}"], value), key
    saved = read_torch_file(path)["network_weights"]
    assert all(torch.equal(loaded[k], saved[k]) for k in fresh_decoder)  # the file's new decoder weights
    assert any(not torch.equal(loaded[k], v) for k, v in fresh_decoder.items())
    # the same file twice: the decoder's fresh weights are seeded
    again = export_volume_state(DenseOnly(dense), "resenc_tiny", "nnunet")["network_weights"]
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_nnunet_loader_refuses_a_file_for_another_plans_configuration(tmp_path):
    """The acceptance above is a real check: nnU-Net's loader rejects an encoder of other widths."""
    path = save_atomic(export_volume_state(DenseOnly(_pretrained("resenc_tiny")), "resenc_tiny", "nnunet"),
                       tmp_path / "nnunet.pt")
    other = RESENC_TINY.__class__(features=(8, 16, 32, 64, 128), strides=RESENC_TINY.strides,
                                  blocks=RESENC_TINY.blocks)
    with pytest.raises(AssertionError, match="not the same|missing"):
        load_pretrained_weights(_plans_network(other, in_chans=1, classes=3), str(path))


def test_resenc_l_export_matches_the_resenc_l_plans_network():
    """ResEnc-L (nnssl's and nnU-Net's nnUNetResEncUNetLPlans for 3d_fullres): the exported network has exactly the
    plans network's keys and shapes (built on the meta device: no memory)."""
    from sparkme.models.volumes import resenc_unet

    with torch.device("meta"):
        ours = resenc_unet("resenc_l", in_chans=1, num_classes=2).state_dict()
        plans = _plans_network(RESENC_L, in_chans=1, classes=2).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in plans.items()}


@pytest.mark.parametrize("name, depth", [("monai_resnet10", 10)])
def test_monai_state_loads_strictly_into_monais_resnet(name, depth):
    dense = _pretrained(name, in_chans=2)
    state = export_volume_state(DenseOnly(dense), name, "monai")
    assert not any(k.startswith("fc.") for k in state)
    for stride in (1, 2):
        model = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=2, feed_forward=False,
                                                conv1_t_stride=stride)
        model.load_state_dict(state, strict=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, fmt, words", [("monai_resnet10", "nnunet", "resenc_"),
                                              ("resenc_tiny", "monai", "monai_"),
                                              ("resenc_tiny", "timm", "2D format")])
def test_a_format_the_model_cannot_take_is_a_usage_error(name, fmt, words):
    with pytest.raises(UsageError, match=words):
        export_volume_state(DenseOnly(create_volume_backbone(name)), name, fmt)


def test_monai_segresnet_state_loads_strictly_into_monais_segresnet():
    dense = _pretrained("monai_segresnet")
    state = export_volume_state(DenseOnly(dense), "monai_segresnet", "monai")
    model = nets.SegResNet(spatial_dims=3, in_channels=1, init_filters=16, blocks_down=(1, 2, 2, 4))
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

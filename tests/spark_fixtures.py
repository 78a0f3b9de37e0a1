"""State dicts in the key layouts of official SparK's released files, written from its code (keyu-tian/SparK,
``pretrain/spark.py``, ``decoder.py``, ``models/convnext.py``, ``utils/misc.py``), with random values: the tests'
stand-ins for the real downloads (no network)."""

from __future__ import annotations

import timm
import torch

Shapes = dict[str, tuple[int, ...]]


def official_convnext_shapes(depths: tuple[int, ...], dims: tuple[int, ...]) -> Shapes:
    """``convnext*_1kpretrained_official_style.pth``: facebookresearch ConvNeXt, built with ``num_classes=0``
    (``norm`` and ``fc`` are Identity, so no head keys)."""
    shapes: Shapes = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
                      "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        p = f"downsample_layers.{i}."
        shapes.update({p + "0.weight": (dims[i - 1],), p + "0.bias": (dims[i - 1],),
                       p + "1.weight": (dims[i], dims[i - 1], 2, 2), p + "1.bias": (dims[i],)})
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes.update({p + "dwconv.weight": (d, 1, 7, 7), p + "dwconv.bias": (d,), p + "norm.weight": (d,),
                           p + "norm.bias": (d,), p + "pwconv1.weight": (4 * d, d), p + "pwconv1.bias": (4 * d,),
                           p + "pwconv2.weight": (d, 4 * d), p + "pwconv2.bias": (d,), p + "gamma": (d,)})
    return shapes


def timm_resnet_shapes(name: str) -> Shapes:
    """``resnet*_1kpretrained_timm_style.pth``: SparK pretrains timm's ResNet itself (``num_classes=0``) and saves
    its state dict; its sparse BN (a BatchNorm1d) keeps BatchNorm2d's key names."""
    return {k: tuple(v.shape) for k, v in timm.create_model(name, num_classes=0).state_dict().items()}


def spark_module_shapes(encoder: Shapes, enc_widths: list[int], width: int, norm: str, input_size: int) -> Shapes:
    """``*_withdecoder_1kpretrained_spark_style.pth``'s ``module``: the whole SparK module.

    Args:
        enc_widths: encoder widths at strides 4, 8, 16, 32.
        norm: ``"bn"`` (ResNets) or ``"ln"`` (ConvNeXt), SparK's densify norm.
    """
    shapes = {f"sparse_encoder.sp_cnn.{k}": s for k, s in encoder.items()}
    d = width
    for i, e in enumerate(reversed(enc_widths)):
        shapes[f"mask_tokens.{i}"] = (1, e, 1, 1)
        shapes.update(_norm_shapes(f"densify_norms.{i}.", e, norm))
        if not (i == 0 and e == d):  # SparK's densify projection is an Identity only there
            k = 1 if i == 0 else 3
            shapes.update({f"densify_projs.{i}.weight": (d, e, k, k), f"densify_projs.{i}.bias": (d,)})
        d //= 2
    channels = [width // 2**i for i in range(6)]
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        p = f"dense_decoder.dec.{i}."
        shapes.update({p + "up_sample.weight": (c_in, c_in, 4, 4), p + "up_sample.bias": (c_in,),
                       p + "conv.0.weight": (c_in, c_in, 3, 3), p + "conv.3.weight": (c_out, c_in, 3, 3)})
        shapes.update(_norm_shapes(p + "conv.1.", c_in, "bn"))
        shapes.update(_norm_shapes(p + "conv.4.", c_out, "bn"))
    shapes.update({"dense_decoder.proj.weight": (3, channels[-1], 1, 1), "dense_decoder.proj.bias": (3,),
                   "imn_m": (1, 3, 1, 1), "imn_s": (1, 3, 1, 1), "norm_black": (1, 3, input_size, input_size)})
    return shapes


def _norm_shapes(prefix: str, c: int, norm: str) -> Shapes:
    if norm == "ln":
        return {prefix + "weight": (c,), prefix + "bias": (c,)}
    return {prefix + "weight": (c,), prefix + "bias": (c,), prefix + "running_mean": (c,), prefix + "running_var": (c,),
            prefix + "num_batches_tracked": ()}


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of plausible scale: small weights, positive running variances, integer batch counters."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + len(state))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def spark_wrapper(module: dict, arch: str, input_size: int) -> dict:
    """SparK's ``save_checkpoint_with_meta_info_and_opt_state`` around ``SparK.state_dict(with_config=True)``."""
    module = dict(module, config={"mask_ratio": 0.6, "densify_norm_str": "bn", "sbn": False, "hierarchy": 4,
                                  "sparse_encoder.input_size": input_size, "dense_decoder.width": 768})
    return {"args": "{'model': '" + arch + "'}", "input_size": input_size, "arch": arch, "epoch": 1599,
            "performance_desc": "0.3901 0.3912", "module": module, "optimizer": {"state": {}, "param_groups": []},
            "is_pretrain": True}

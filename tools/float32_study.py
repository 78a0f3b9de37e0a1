"""Where do float32 gradients of a sparse ResNet-50 lose accuracy? (not part of CI; the numbers are in README.md)

Runs the setting of ``tests/test_encoders.py`` (randomised BN affines and running stats, batch 2, 224x224, random
projections of the 4 feature maps drawn **in float64** and cast) and compares every parameter gradient with the
float64 masked oracle:

- ``masked``, ``torch``, ``minkowski`` in float32, as they are;
- ``torch`` in float32 with its gather-GEMM convolutions and BatchNorm computed in float64 (cast back to float32):
  if the kernels' own float32 accumulation were the cause, this would bring ``torch`` down to ``masked``;
- float64 ``masked`` with every conv and BN output rounded to float32 (``.float().double()``): float32's rounding
  error injected into exact arithmetic, so the spread over implementations is the problem's own sensitivity;
- float32 ``masked`` with the two images swapped (an equally valid summation order).

Errors are reported two ways per tensor: ``max|err| / max|truth|`` (the test suite's ``relative_error``) and
``||err|| / ||truth||``, plus ``||truth|| / ||all gradients of the encoder||`` to show how small the bad tensors are.

    .venv/bin/python tools/float32_study.py [--ratios 0.6,0.9] [--model resnet50] [--top 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
from pathlib import Path
from unittest import mock

import timm
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import randomise_affine  # noqa: E402  (the affine randomisation the encoder tests use)
from sparkme import SparseEncoder, random_mask
from sparkme.sparse import base, masked_backend, ops, torch_backend


def inputs(ratio: float, batch: int = 2, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    return images, random_mask(batch, size // 32, size // 32, ratio, generator=generator)


def gradients(dense, backend, images, mask, dtype, swap: bool = False) -> dict[str, torch.Tensor]:
    """Parameter gradients (float64) of ``sum_i <feature_i, projection_i>`` with float64-drawn projections;
    ``swap``: the batch in reverse order (images, mask and projections alike: the same sum, another order)."""
    encoder = SparseEncoder.from_dense(copy.deepcopy(dense).to(dtype), backend=backend).train()
    order = torch.arange(images.shape[0]).flip(0) if swap else torch.arange(images.shape[0])
    features = encoder(images[order].to(dtype), mask[order])
    generator = torch.Generator().manual_seed(2)
    projections = [torch.randn(f.shape, generator=generator, dtype=torch.float64)[order].to(dtype)
                   for f in features]
    sum((f * p).sum() for f, p in zip(features, projections)).backward()
    return {name: p.grad.double() for name, p in encoder.named_parameters()}


@contextlib.contextmanager
def float64_kernels():
    """The torch backend's gather-GEMM / depthwise / 1x1 convs and every BatchNorm computed in float64."""
    gather_conv, linear_conv1x1 = torch_backend.gather_conv, base.linear_conv1x1

    def linear64(features, weight, bias, groups):
        bias = None if bias is None else bias.double()
        return linear_conv1x1(features.double(), weight.double(), bias, groups).to(features.dtype)

    def conv64(features, neighbours, weight, bias, spec):
        out = gather_conv(features.double(), neighbours, weight.double(), None if bias is None else bias.double(),
                          spec)
        return out.to(features.dtype)

    def bn64(x, bn):
        rows = x.visible_rows(x.features)
        mean, var = bn.running_mean.double(), bn.running_var.double()
        out = F.batch_norm(rows.double(), mean, var, bn.weight.double(), bn.bias.double(), bn.training,
                           bn.momentum, bn.eps)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return x.from_visible_rows(out.to(rows.dtype))

    with mock.patch.object(torch_backend, "gather_conv", conv64), mock.patch.object(base, "linear_conv1x1", linear64), \
            mock.patch.object(ops, "batch_norm", bn64):
        yield


@contextlib.contextmanager
def float64_minkowski_convs():
    """MinkowskiEngine's own conv kernels run in float64 (features and kernel cast up, the output cast back)."""
    from sparkme.sparse import minkowski_backend

    function = minkowski_backend.ME.MinkowskiConvolutionFunction

    class Float64Convolution:
        @staticmethod
        def apply(features, kernel, *rest):
            return function.apply(features.double(), kernel.double(), *rest).to(features.dtype)

    with mock.patch.object(minkowski_backend.ME, "MinkowskiConvolutionFunction", Float64Convolution):
        yield


@contextlib.contextmanager
def float32_rounding_in_float64(seed: int):
    """float64 masked arithmetic, but each conv and BN output rounded to float32 and nudged by one float32 ulp
    in a random direction (``seed``): a model of float32 rounding error with exact arithmetic everywhere else."""
    conv, batch_norm = masked_backend.MaskedDenseMap.conv2d, ops.batch_norm
    generator = torch.Generator().manual_seed(seed)

    def rounded(x):
        features = x.features
        noise = torch.rand(features.shape, generator=generator, dtype=torch.float64) - 0.5
        return x.with_features(features.float().double() * (1 + noise * 2.0 ** -23))

    with mock.patch.object(masked_backend.MaskedDenseMap, "conv2d", lambda self, c: rounded(conv(self, c))), \
            mock.patch.object(ops, "batch_norm", lambda x, bn: rounded(batch_norm(x, bn))):
        yield


def errors(actual: dict, truth: dict) -> dict[str, tuple[float, float, float]]:
    """name -> (max-relative error, norm-relative error, ||truth|| / ||all truth||)."""
    total = math.sqrt(sum(float(t.square().sum()) for t in truth.values()))
    everything = math.sqrt(sum(float((actual[k] - t).square().sum()) for k, t in truth.items())) / total
    out = {"(all parameters)": (float("nan"), everything, 1.0)}
    for name, t in truth.items():
        diff = actual[name] - t
        out[name] = (float(diff.abs().max() / t.abs().max()), float(diff.norm() / t.norm()), float(t.norm()) / total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ratios", default="0.6,0.9")
    parser.add_argument("--top", type=int, default=8, help="worst tensors listed per variant")
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--backends-only", action="store_true", help="skip the float64-kernel and rounding runs")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (train-mode BN sees more rows)")
    args = parser.parse_args()
    make = getattr(torchvision.models, args.model, None) or (lambda: timm.create_model(args.model))
    dense = randomise_affine(make())
    for ratio in (float(r) for r in args.ratios.split(",")):
        images, mask = inputs(ratio, batch=args.batch)
        truth = gradients(dense, "masked", images, mask, torch.float64)
        variants = {name: gradients(dense, name, images, mask, torch.float32) for name in ("masked", "torch",
                                                                                           "minkowski")}
        with float64_minkowski_convs():
            variants["minkowski, float64 ME convs"] = gradients(dense, "minkowski", images, mask, torch.float32)
        if not args.backends_only:
            with float64_kernels():
                variants["torch, float64 kernels+BN"] = gradients(dense, "torch", images, mask, torch.float32)
            variants["masked, batch reversed"] = gradients(dense, "masked", images, mask, torch.float32, swap=True)
            variants["torch, batch reversed"] = gradients(dense, "torch", images, mask, torch.float32, swap=True)
        for seed in range(0 if args.backends_only else args.noise_seeds):
            with float32_rounding_in_float64(seed):
                variants[f"float64 + float32 rounding #{seed}"] = gradients(dense, "masked", images, mask,
                                                                           torch.float64)
        print(f"\n=== {args.model}, batch {args.batch}, mask ratio {ratio}: gradient errors vs float64 masked ===")
        print(f"{'variant':36s} {'all params':>10s} {'worst max-rel':>13s} {'worst norm-rel':>14s} {'#>1e-3':>7s} "
              f"{'#>1e-2':>7s}  worst tensor (norm-rel, its share of ||grad||)")
        table = {}
        for name, grads in variants.items():
            err = errors(grads, truth)
            table[name] = err
            overall = err.pop("(all parameters)")[1]
            worst = max(err, key=lambda k: err[k][1])
            print(f"{name:36s} {overall:10.2e} {max(e[0] for e in err.values()):13.2e} {err[worst][1]:14.2e} "
                  f"{sum(e[1] > 1e-3 for e in err.values()):7d} {sum(e[1] > 1e-2 for e in err.values()):7d}"
                  f"  {worst} ({err[worst][1]:.2e}, {err[worst][2]:.1e})")
        for metric, index in (("max-relative", 0), ("norm-relative", 1)):
            print(f"\nworst {args.top} tensors by {metric} error in any float32 backend, share of ||grad||, and "
                  f"their {metric} error per variant:")
            names = sorted(truth, key=lambda k: -max(table[v][k][index] for v in ("masked", "torch", "minkowski")))
            print(f"{'tensor':28s} {'share':>8s} " + " ".join(f"{v[:14]:>14s}" for v in table))
            for name in names[:args.top]:
                print(f"{name:28s} {table['torch'][name][2]:8.1e} "
                      + " ".join(f"{table[v][name][index]:14.2e}" for v in table))
        layer3 = [k for k in truth if k.startswith("layer3")] or list(truth)
        print("\nlayer3 (every tensor if none): worst max-relative / norm-relative error per variant")
        for name in table:
            print(f"{name:36s} {max(table[name][k][0] for k in layer3):10.2e} "
                  f"{max(table[name][k][1] for k in layer3):10.2e}")


if __name__ == "__main__":
    main()

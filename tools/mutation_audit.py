"""Mutation audit (not part of CI): plant known bugs one at a time in a copy of the repository and check that the
tests meant to catch them fail.

Each mutation is a textual search/replace in one or more files (alternatives allowed, for code that other work may
reshape); it is applied to a fresh copy of the working tree under a temporary folder (this checkout is never
modified), then each of its test groups runs there with ``pytest -x``. Results:

- ``killed``   at least one group failed (the failing test is named);
- ``SURVIVED`` every group passed: a hole in the tests;
- ``STALE``    a search text is no longer in the code: update the mutation (the report shows which text);
- ``timeout``  a group ran past ``--timeout``.

A baseline run of every group on the unmutated copy comes first: a group already failing there proves nothing.

    .venv/bin/python tools/mutation_audit.py                 # all mutations, report on stdout
    .venv/bin/python tools/mutation_audit.py --only densify  # names containing "densify"
    .venv/bin/python tools/mutation_audit.py --check         # only check that every search text is still found
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edit:
    """Replace ``search`` by ``replace`` in ``path``; the first alternative whose search text is found is used."""

    path: str
    alternatives: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    edits: tuple[Edit, ...]
    groups: tuple[tuple[str, ...], ...]  # each: pytest arguments (paths and -k selections), run separately
    issue_table: bool = True  # one of the bugs listed in issue 16's table (the others are extra)
    results: list = field(default_factory=list, compare=False)


def _edit(path: str, *pairs: tuple[str, str]) -> Edit:
    return Edit(path, tuple(pairs))


ONES_IN_RUNNING_VAR = ("    state = {k: torch.ones_like(v) if k.endswith('running_var') else v\n"
                       "             for k, v in state.items()}\n")
FLOAT32_GROUPS = (("tests/test_float32_gradients.py", "-k", "torch"),
                  ("tests/test_encoders.py::test_sparse_backends_in_float32_are_as_accurate_as_the_oracle[resnet18-0.6]",))

MUTATIONS = [
    Mutation(
        "gather-gemm-float32-input-grad-x1.5",
        "float32 input gradient of the gather-GEMM conv scaled by 1.5 (float64 untouched)",
        (_edit("sparkme/sparse/kernels.py",
               ("                grad_features = _gather_rows(grad_out, table) @ _gemm_weight(mirrored)\n",
                "                grad_features = _gather_rows(grad_out, table) @ _gemm_weight(mirrored)\n"
                "                if grad_out.dtype == torch.float32:\n"
                "                    grad_features = grad_features * 1.5\n")),),
        FLOAT32_GROUPS),
    Mutation(
        "gather-gemm-float32-weight-grad-negated",
        "float32 weight gradient of the gather-GEMM conv negated (float64 untouched)",
        (_edit("sparkme/sparse/kernels.py",
               ("            grad_weight = grad_weight.contiguous().to(saved_weight.dtype)\n",
                "            grad_weight = grad_weight.contiguous().to(saved_weight.dtype)\n"
                "            if grad_out.dtype == torch.float32:\n"
                "                grad_weight = -grad_weight\n"),
               ("            grad_weight = grad_weight.permute(0, 3, 1, 2).contiguous().to(saved_weight.dtype)\n",
                "            grad_weight = grad_weight.permute(0, 3, 1, 2).contiguous().to(saved_weight.dtype)\n"
                "            if grad_out.dtype == torch.float32:\n"
                "                grad_weight = -grad_weight\n")),),
        FLOAT32_GROUPS),
    Mutation(
        "batch-norm-statistics-over-all-sites",
        "ops.batch_norm takes its statistics over every site (masked zeros included) on the masked backend",
        (_edit("sparkme/sparse/ops.py",
               ("    rows = x.visible_rows(x.unmasked_features)\n    out = bn(rows[:, :, None, None])[:, :, 0, 0]\n",
                "    everything = x.features.reshape(-1, x.num_channels)\n"
                "    out = bn(everything[:, :, None, None])[:, :, 0, 0]\n"
                "    out = x.visible_rows(out.reshape(x.features.shape))\n"),
               ("    rows = x.visible_rows(x.features)\n    out = bn(rows[:, :, None, None])[:, :, 0, 0]\n",
                "    everything = x.features.reshape(-1, x.num_channels)\n"
                "    out = bn(everything[:, :, None, None])[:, :, 0, 0]\n"
                "    out = x.visible_rows(out.reshape(x.features.shape))\n"),
               ("    out = bn(rows[:, :, None, None])[:, :, 0, 0]\n    return x.from_visible_rows(out)\n",
                "    everything = x.features.reshape(-1, x.num_channels)\n"
                "    out = bn(everything[:, :, None, None])[:, :, 0, 0]\n"
                "    return x.from_visible_rows(x.visible_rows(out.reshape(x.features.shape)))\n")),),
        (("tests/test_ops_reference.py", "-k", "batch_norm"),)),
    Mutation(
        "densify-mask-token-everywhere",
        "Densify writes the mask token at every site",
        (_edit("sparkme/models/spark.py",
               ("x.to_dense(fill=self.mask_token)", "(x.to_dense() * 0 + self.mask_token.view(1, -1, 1, 1))")),),
        (("tests/test_spark_model.py", "-k", "densify"),)),
    Mutation(
        "densify-mask-token-also-at-visible-sites",
        "Densify adds the mask token at visible sites too",
        (_edit("sparkme/models/spark.py",
               ("x.to_dense(fill=self.mask_token)", "(x.to_dense(fill=self.mask_token) + self.mask_token.view(1, -1, "
                                                   "1, 1) * x.dense_mask()[:, None])")),),
        (("tests/test_spark_model.py", "-k", "densify"),)),
    Mutation(
        "decoder-stride-4-skip-times-0",
        "the decoder multiplies the stride-4 densified map by 0",
        (_edit("sparkme/models/decoder.py",
               ("                x = x + features[i]\n",
                "                x = x + features[i] * (0 if i == 3 else 1)\n")),),
        (("tests/test_spark_model.py", "-k", "decoder or gradient_reaches"),)),
    Mutation(
        "export-writes-ones-into-running-var",
        "export_state_dict replaces every running_var by ones",
        (_edit("sparkme/export.py",
               ("    state = dense.state_dict()\n", "    state = dense.state_dict()\n" + ONES_IN_RUNNING_VAR),
               ("    state = encoder.to_dense().state_dict()\n",
                "    state = encoder.to_dense().state_dict()\n" + ONES_IN_RUNNING_VAR)),),
        (("tests/test_export_values.py",),)),
    Mutation(
        "export-cli-exports-an-untrained-model",
        "the export CLI rebuilds the model but never loads the checkpoint's weights",
        (_edit("sparkme/export.py",
               ('        model.load_state_dict(state["model"], strict=True)\n', "        model.train()\n"),
               ('    model.load_state_dict(state["model"], strict=True)\n', "    model.train()\n")),),
        (("tests/test_export_values.py", "-k", "cli"),)),
    Mutation(
        "reconstruct-pastes-at-visible-patches",
        "SparK.reconstruct pastes the prediction on visible patches and the input on hidden ones",
        (_edit("sparkme/models/spark.py",
               ("torch.where(pixel_mask, images, predicted)", "torch.where(pixel_mask, predicted, images)"),
               ("torch.where(pixel_mask, images, output)", "torch.where(pixel_mask, output, images)")),),
        (("tests/test_spark_model.py", "-k", "reconstruct"),)),
    Mutation(
        "convnext-block-skips-drop-path",
        "the ConvNeXt block never applies its DropPath",
        (_edit("sparkme/convert/convnext_leaf.py",
               ("        out = ops.drop_path(out, block.drop_path)\n", "        out = out\n")),),
        (("tests/test_dropout_oracle.py", "-k", "convnext"),)),
    # --- extra mutations, not in the issue's table ---------------------------------------------------------------
    Mutation(
        "grn-norm-pooled-over-the-batch",
        "GRN's L2 norm pooled over the whole batch (ConvNeXt-V2's Minkowski bug)",
        (_edit("sparkme/sparse/ops.py",
               ("    norms = x.per_sample_sum(features * features).sqrt()",
                "    norms = x.per_sample_sum(features * features).sum(0, keepdim=True)"
                ".expand(x.context.batch_size, -1).sqrt()")),),
        (("tests/test_ops_reference.py", "-k", "global_response"),), issue_table=False),
    Mutation(
        "drop-path-not-rescaled",
        "DropPath keeps samples without dividing by the keep probability",
        (_edit("sparkme/sparse/ops.py",
               ("        per_sample = per_sample / keep\n", "        per_sample = per_sample\n")),),
        (("tests/test_ops_reference.py", "-k", "drop_path"),), issue_table=False),
    Mutation(
        "residual-block-skips-drop-path",
        "timm ResNet blocks never apply their DropPath",
        (_edit("sparkme/convert/op_table.py",
               ("    timm.layers.DropPath: SparseOp(lambda drop, x: ops.drop_path(x, drop)),",
                "    timm.layers.DropPath: SparseOp(_identity),")),),
        (("tests/test_dropout_oracle.py", "-k", "resnet18"),), issue_table=False),
    Mutation(
        "layer-norm-without-affine",
        "ops.layer_norm ignores the LayerNorm's weight and bias",
        (_edit("sparkme/sparse/ops.py", ("ln.weight, ln.bias, ln.eps", "None, None, ln.eps")),),
        (("tests/test_ops_reference.py", "-k", "layer_norm"),), issue_table=False),
    Mutation(
        "batch-norm-running-stats-frozen",
        "ops.batch_norm normalises with batch statistics but never updates the running ones",
        (_edit("sparkme/sparse/ops.py",
               ("    out = bn(rows[:, :, None, None])[:, :, 0, 0]\n",
                "    out = F.batch_norm(rows, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) if bn.training "
                "else bn(rows[:, :, None, None])[:, :, 0, 0]\n")),),
        (("tests/test_ops_reference.py", "-k", "batch_norm_in_train"),), issue_table=False),
    Mutation(
        "reconstruct-forgets-the-patch-mean",
        "SparK.reconstruct un-normalises with the patch std but not its mean",
        (_edit("sparkme/models/spark.py", (" * std + mean, h, w)", " * std, h, w)"),
               (" * std + mean, mask.shape[1:]", " * std, mask.shape[1:]")),),
        (("tests/test_spark_model.py", "-k", "reconstruct"),), issue_table=False),
    Mutation(
        "depthwise-float32-weight-grad-x1.5",
        "float32 weight gradient of the submanifold depthwise conv scaled by 1.5",
        (_edit("sparkme/sparse/grid_depthwise.py",
               ("        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)\n",
                "        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)\n"
                "        if grad_weight is not None and grad_out.dtype == torch.float32:\n"
                "            grad_weight = grad_weight * 1.5\n")),),
        (("tests/test_float32_gradients.py", "-k", "depthwise"),), issue_table=False),
    Mutation(
        "strided-conv-scatter-add-float32-drops-a-tap",
        "float32 input gradient of strided gather-GEMM convs loses the last tap's contribution",
        (_edit("sparkme/sparse/kernels.py",
               ("                grad_columns = (grad_out @ _weight_rows(weight)).reshape(-1, c_in)\n",
                "                grad_columns = (grad_out @ _weight_rows(weight)).reshape(-1, c_in)\n"
                "                if grad_out.dtype == torch.float32:\n"
                "                    grad_columns = grad_columns.reshape(grad_out.shape[0], -1, c_in).clone()\n"
                "                    grad_columns[:, -1] = 0\n"
                "                    grad_columns = grad_columns.reshape(-1, c_in)\n")),),
        (("tests/test_float32_gradients.py", "-k", "torch and s2"),), issue_table=False),
    Mutation(
        "loss-averaged-over-visible-patches",
        "the SparK loss averages over the visible patches instead of the masked ones",
        (_edit("sparkme/models/spark.py", ("    hidden = (~mask).flatten(1)", "    hidden = mask.flatten(1)")),),
        (("tests/test_pretrain.py", "-k", "independent_spark_loss"),), issue_table=False),
    # --- volumes (3-D) ---
    Mutation(
        "3d-instance-norm-over-all-sites",
        "sparse instance / group norm divides by every site of the grid instead of the sample's visible ones",
        (_edit("sparkme/sparse/ops.py",
               ("    counts = (x.per_sample_count().to(features.dtype) * per_group)[:, None]",
                "    counts = (torch.full_like(x.per_sample_count(), x.dense_mask()[0].numel()).to(features.dtype)"
                " * per_group)[:, None]")),),
        (("tests/test_volumes3d.py", "-k", "instance_norm_statistics"),), issue_table=False),
    Mutation(
        "3d-max-pool-over-masked-sites",
        "the oracle's max pool lets masked sites (zeros) take part, as a zero-filled masked-dense pool does",
        (_edit("sparkme/sparse/masked_backend.py",
               ('torch.where(visible, self.unmasked_features, float("-inf"))',
                'torch.where(visible, self.unmasked_features, 0.0)')),),
        (("tests/test_volumes3d.py", "-k", "max_pool_with_negatives"),), issue_table=False),
    Mutation(
        "3d-mask-grid-finer-than-bottleneck",
        "3-D SparK's mask cells are half the encoder's total stride (nnssl's 16^3 blocks on a stride-32 ResEnc)",
        (_edit("sparkme/models/volumes.py",
               ('    return entry.resenc.stage_strides[-1] if entry.resenc is not None else 32',
                '    return entry.resenc.stage_strides[-1] // 2 if entry.resenc is not None else 16')),
         _edit("sparkme/models/spark.py", ('        patch = levels[-1]["reduction"]\n',
                                            '        patch = volume_patch_size(model_name)\n')),
         _edit("sparkme/models/spark.py", ("from sparkme.models.volumes import create_volume_backbone, ",
                                            "from sparkme.models.volumes import volume_patch_size, "
                                            "create_volume_backbone, "))),
        (("tests/test_volumes3d.py", "-k", "spark_rules"),), issue_table=False),
    Mutation(
        "3d-unmasked-input",
        "the oracle's first convolution reads the unmasked volume (nnssl feeds the network the whole volume)",
        (_edit("sparkme/sparse/masked_backend.py",
               ("        return cls(context, 1, images.movedim(1, -1))",
                "        return cls(context, 1, images.movedim(1, -1), already_masked=True)")),),
        (("tests/test_volumes3d.py", "-k", "spark_rules"),), issue_table=False),
    Mutation(
        "3d-block-halo-overwrites",
        "the patch-block conv's input gradient keeps one block's halo gradient instead of summing the overlaps",
        (_edit("sparkme/sparse/block_conv.py",
               ("padded.index_add_(0, table.view(-1), columns)", "padded.index_copy_(0, table.view(-1), columns)")),),
        (("tests/test_block_conv.py",), ("tests/test_volumes3d.py", "-k", "equal_the_masked_oracle")),
        issue_table=False),
    Mutation(
        "3d-block-order-transposed",
        "the patch-block conv returns each block's sites in (z, x, y) order instead of row-major (z, y, x)",
        (_edit("sparkme/sparse/block_conv.py",
               ("within = ((coords[:, 1] % side) * side + coords[:, 2] % side) * side + coords[:, 3] % side",
                "within = ((coords[:, 1] % side) * side + coords[:, 3] % side) * side + coords[:, 2] % side")),),
        (("tests/test_block_conv.py",), ("tests/test_volumes3d.py", "-k", "equal_the_masked_oracle")),
        issue_table=False),
]


def _copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files), without .git or .venv."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listing):
        source, target = REPO / relative, destination / relative
        if source.is_symlink():  # e.g. sparkme/conf -> ../conf: keep it a link, relative as in the repository
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _apply(mutation: Mutation, root: Path) -> str | None:
    """Apply every edit under ``root``; the reason when one cannot be applied, else None."""
    for edit in mutation.edits:
        path = root / edit.path
        if not path.is_file():
            return f"{edit.path} does not exist"
        text = path.read_text()
        for search, replace in edit.alternatives:
            count = text.count(search)
            if count == 1:
                path.write_text(text.replace(search, replace))
                break
            if count > 1:
                return f"search text found {count} times in {edit.path}: {search.strip()[:70]!r}"
        else:
            wanted = " | ".join(repr(s.strip()[:70]) for s, _ in edit.alternatives)
            return f"search text not found in {edit.path}: {wanted}"
    return None


def _pytest(root: Path, args: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """(outcome, detail, seconds) of ``pytest -x -q args`` run in ``root`` against ``root``'s own sparkme."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    started = time.time()
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"> {timeout:.0f} s", time.time() - started
    seconds = time.time() - started
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "passed", re.findall(r"\d+ passed", output)[-1] if "passed" in output else "", seconds
    if result.returncode == 5:
        return "error", "no test selected", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    return ("failed" if result.returncode == 1 else "error"), (failed[0] if failed else output.strip()[-300:]), seconds


def _check_imports_from(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root))
    where = subprocess.run([sys.executable, "-c", "import sparkme; print(sparkme.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the copy imports sparkme from {where}, not from {root}: results would be meaningless")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--check", action="store_true", help="only check that every search text is found")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test group")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)
    selected = [m for m in MUTATIONS if args.only in m.name]
    workspace = Path(tempfile.mkdtemp(prefix="sparkme-mutation-audit-"))
    try:
        base = workspace / "base"
        _copy_tree(base)
        _check_imports_from(base)
        stale = {}
        for mutation in selected:
            probe = workspace / "probe"
            shutil.copytree(base, probe)
            stale[mutation.name] = _apply(mutation, probe)
            shutil.rmtree(probe)
        if args.check:
            for name, reason in stale.items():
                print(f"{'STALE' if reason else 'ok':6s} {name}" + (f": {reason}" if reason else ""))
            return 1 if any(stale.values()) else 0

        baseline = {}
        if not args.no_baseline:
            for group in dict.fromkeys(g for m in selected for g in m.groups):
                baseline[group] = _pytest(base, group, args.timeout)
                print(f"baseline {' '.join(group)}: {baseline[group][0]} ({baseline[group][1]}, "
                      f"{baseline[group][2]:.0f} s)", flush=True)
        rows = []
        for mutation in selected:
            if stale[mutation.name]:
                rows.append((mutation, "STALE", stale[mutation.name], 0.0))
                print(f"{mutation.name}: STALE", flush=True)
                continue
            copy = workspace / mutation.name
            shutil.copytree(base, copy)
            _apply(mutation, copy)
            details, total, status = [], 0.0, "SURVIVED"
            for group in mutation.groups:
                if baseline.get(group, ("passed",))[0] != "passed":
                    details.append(f"[{' '.join(group)}] baseline not passing: no evidence")
                    continue
                outcome, detail, seconds = _pytest(copy, group, args.timeout)
                total += seconds
                if outcome in ("failed", "error"):
                    status = "killed"
                    details.append(f"{detail}" + (" (error)" if outcome == "error" else ""))
                elif outcome == "timeout" and status != "killed":
                    status = "timeout"
                    details.append(f"[{' '.join(group)}] timeout")
                else:
                    details.append(f"[{' '.join(group)}] {outcome}")
            rows.append((mutation, status, "; ".join(details), total))
            print(f"{mutation.name}: {status} ({total:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(copy)
        print("\n| mutation | in issue table | result | failing test (per group) | s |\n|---|---|---|---|---|")
        for mutation, status, detail, seconds in rows:
            print(f"| {mutation.name} | {'yes' if mutation.issue_table else 'extra'} | {status} | {detail} | "
                  f"{seconds:.0f} |")
        bad = [m.name for m, status, _, _ in rows if status != "killed"]
        print(f"\n{len(rows) - len(bad)}/{len(rows)} killed" + (f"; not killed: {', '.join(bad)}" if bad else ""))
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"copies kept in {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

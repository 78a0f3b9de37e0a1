"""Speed and memory of the sparse backends against SparK's masked-dense formulation, in one process.

    sparkme-bench --models resnet50,convnext_small --ratios 0.6,0.75 --batch-sizes 8

For every model x batch size x mask ratio, on the *same* seeded images and mask and the same weights, each backend
(``minkowski``, ``torch``, ``masked``) runs
  * the encoder's forward + backward (loss = sum of the means of its 4 feature maps), and
  * the whole SparK training step as in pretraining: encoder, densify, the paper's width-768 decoder, loss,
    backward, global-norm clip at 5 and the LAMB step (``FusedLamb``, pretraining's), with this project's speed-ups
    of the dense half (``SparK.dense_layout``: channels-last on CPU; ``--bf16`` opt-in autocast);
and the **reference step** runs once more: ``masked`` with the plain (contiguous, float32) dense half and timm's own
LAMB step, i.e. SparK's own step. Variants are interleaved (every repeat visits each once, in turn) so that drift
of the machine hits all alike; medians over the repeats after warm-up are reported, with their spread ((max - min) /
median of the repeats).

Ratios: ``enc_vs_masked`` (encoder against masked's encoder; ideal ``1/visible``), ``step_vs_masked`` and
``step_vs_reference`` (step against masked's / the reference step). The **attainable** ratios take the measured
split of the step: the encoder at its ideal (masked's encoder time x the visible fraction) plus this variant's
measured dense part (``dense_ms`` = step - encoder: densify, decoder, loss, optimizer); their distance to the
measured ratio is what a faster sparse encoder could still win.

Memory: on CPU the bytes held for backward at the end of the forward pass (``sparkme.bench.memory``), for the
encoder and for the whole step's graph; on CUDA ``torch.cuda.max_memory_allocated`` during the timed call minus what
was allocated before it. On Linux CPUs also the **peak RSS** of one encoder pass and one whole step above the
resident memory before it (``sparkme.bench.peak_rss``): every temporary included, not only what autograd keeps.

Results: a table on stdout, ``results.csv``, ``results.json`` and ``speedup.png`` in the output folder.
"""

from sparkme.bench.cli import main
from sparkme.bench.report import COLUMNS
from sparkme.bench.run import run_benchmark
from sparkme.bench.settings import BenchSettings

__all__ = ["COLUMNS", "BenchSettings", "main", "run_benchmark"]

"""``sparkme-bench loader`` at a tiny size: every variant is measured and sized in workers."""

from __future__ import annotations

from sparkme.bench.cli import main


def test_a_tiny_loader_bench_measures_every_variant(capsys):
    assert main(["loader", "--images", "4", "--seconds", "0.01"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "img/s" not in line]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert names[:5] == ["folder (PIL)", "shards (pil)", "shards (torchvision)", "bytes (pil)", "bytes (torchvision)"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0 and all(int(cell) >= 1 for cell in cells[3:])

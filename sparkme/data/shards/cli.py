"""``sparkme-shards``: write an image folder as WebDataset shards, or count existing shards into a manifest.

    sparkme-shards write /data/imagenet/train /data/in1k-shards --per-shard 1000
    sparkme-shards count '/data/in1k-shards/train-{000000..001281}.tar' --manifest /data/in1k-shards/manifest.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparkme.errors import run_reporting_usage_errors

COMMAND = "sparkme-shards"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the images of a folder as shards with manifest.json")
    write.add_argument("root", help="folder of images (flat, or one sub-folder per class: labels go in .cls)")
    write.add_argument("out", help="folder for <prefix>-000000.tar ... and manifest.json")
    write.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    write.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    count = commands.add_parser("count", help="count the samples of shards and write their manifest")
    count.add_argument("urls", nargs="+", help="shards: paths, brace patterns, globs or pipe:<command>")
    count.add_argument("--manifest", required=True, help="the manifest.json to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def run() -> None:
        if args.command == "write":
            from sparkme.data.shards.writer import write_shards

            paths = write_shards(args.root, args.out, args.per_shard, args.prefix, args.seed)
            print(f"wrote {len(paths)} shard(s) and {Path(args.out) / 'manifest.json'}")
            return
        from sparkme.data.shards.manifest import write_manifest
        from sparkme.data.shards.sources import expand_urls
        from sparkme.data.shards.tar_samples import count_samples

        urls = expand_urls(args.urls)
        sizes = [count_samples(url) for url in urls]
        write_manifest(args.manifest, urls, sizes)
        print(f"{len(urls)} shard(s), {sum(sizes)} samples: {args.manifest}")

    run_reporting_usage_errors(COMMAND, run)


if __name__ == "__main__":
    main()

"""``mergeforge merge`` through the Python API: the same arguments as the CLI's, run by calling
``mergeforge.merge()`` in one Python process, so the benchmark can time the API door exactly as it
times the command line (``versus.py --b "api=python benchmarks/python_api.py"``).

Example:
    python benchmarks/python_api.py merge recipe.yml out/ --quiet --no-copy-tokenizer --threads 2
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("recipe")
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-copy-tokenizer", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    import mergeforge

    result = mergeforge.merge(args.recipe, args.out_dir, quiet=args.quiet, copy_tokenizer=not args.no_copy_tokenizer,
                              threads=args.threads, dry_run=args.dry_run)
    if args.dry_run:
        print("\n".join(result.plan_lines))


if __name__ == "__main__":
    main()
